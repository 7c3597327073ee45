#!/usr/bin/env python3
"""Sends one HMP command to a QEMU monitor UNIX socket and prints the answer.
   hmp.py <socket> "<command>" [wait_seconds]"""
import socket, sys, time

path, cmd = sys.argv[1], sys.argv[2]
wait = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.settimeout(wait)
def drain():
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except socket.timeout:
        pass
    return out
drain()
s.sendall(cmd.encode() + b"\n")
print(drain().decode(errors="replace").replace("\r", ""))
