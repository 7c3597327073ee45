#!/usr/bin/env bash
# Makes a directory of TLS files for encrypted migration (send-migration / receive-migration
# with tls_dir=<dir>): a fresh CA each run, a server certificate for the receiving VMM and a
# client certificate for the sending one, both signed by that CA.
#
#   scripts/make-test-certs.sh <dir> [extra-name...]
#
# Writes <dir>/ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem
# (keys mode 0600). The server certificate is valid for localhost, 127.0.0.1, ::1 and every
# extra name given (an IP address or a DNS name). The CA's private key is thrown away: a test
# CA signs these two certificates and nothing else. Exits 0 only when every file was written and
# both certificates verify against the new CA.
set -euo pipefail

usage() {
    echo "usage: $0 <dir> [extra-name...]" >&2
    exit 2
}
[[ $# -ge 1 && "$1" != -* ]] || usage
dir=$1
shift

command -v openssl >/dev/null || { echo "make-test-certs: openssl is not installed" >&2; exit 1; }
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        san+=",IP:$name"
    else
        san+=",DNS:$name"
    fi
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { echo "0x$(openssl rand -hex 12)"; }

# The CA: a new key and subject every run, so certificates of two runs never chain to each other.
key "$work/ca-key.pem"
openssl req -x509 -new -key "$work/ca-key.pem" -sha256 -days 30 \
    -subj "/CN=ch-migration test CA $(openssl rand -hex 6)" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -set_serial "$(serial)" -out "$work/ca-cert.pem"

# One leaf certificate: $1 = server|client, $2 = extended key usage.
leaf() {
    local who=$1 usage=$2
    key "$work/$who-key.pem"
    openssl req -new -key "$work/$who-key.pem" -subj "/CN=ch-migration $who" \
        -out "$work/$who.csr"
    cat >"$work/$who.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=$usage
subjectAltName=$san
EXT
    openssl x509 -req -in "$work/$who.csr" -CA "$work/ca-cert.pem" -CAkey "$work/ca-key.pem" \
        -set_serial "$(serial)" -days 30 -sha256 -extfile "$work/$who.ext" \
        -out "$work/$who-cert.pem" 2>/dev/null
}
leaf server serverAuth
leaf client clientAuth

openssl verify -CAfile "$work/ca-cert.pem" "$work/server-cert.pem" "$work/client-cert.pem" >/dev/null

umask 077
for f in server-key.pem client-key.pem; do
    install -m 0600 "$work/$f" "$dir/$f"
done
for f in ca-cert.pem server-cert.pem client-cert.pem; do
    install -m 0644 "$work/$f" "$dir/$f"
done
for f in ca-cert.pem server-cert.pem server-key.pem client-cert.pem client-key.pem; do
    [[ -s "$dir/$f" ]] || { echo "make-test-certs: $dir/$f was not written" >&2; exit 1; }
done
openssl verify -CAfile "$dir/ca-cert.pem" "$dir/server-cert.pem" "$dir/client-cert.pem" >/dev/null
echo "make-test-certs: wrote $dir (server certificate for $san)"
