//! Keyboard input for `--serial tty`: a thread forwards the VMM's standard input to the guest's
//! serial port, with the terminal in raw mode (restored when the device manager goes away).

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::serial::SerialDevice;

/// The terminal settings to put back, if standard input is a terminal.
pub struct StdinForwarder {
    saved: Option<libc::termios>,
}

impl StdinForwarder {
    /// Starts forwarding standard input to `serial`.
    pub fn start(serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<Self> {
        let saved = raw_mode()?;
        std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || forward(serial))?;
        Ok(StdinForwarder { saved })
    }
}

impl Drop for StdinForwarder {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores settings read from the same descriptor by tcgetattr.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// Puts a terminal on standard input into raw mode; returns the settings it had.
fn raw_mode() -> std::io::Result<Option<libc::termios>> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return Ok(None);
    }
    // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `saved` is a valid termios buffer.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut raw = saved;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: `raw` is a valid termios derived from the terminal's own settings.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(saved))
}

fn forward(serial: Arc<Mutex<SerialDevice>>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("serial input stopped: {e}");
                return;
            }
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(pending);
            pending = &pending[taken..];
            if taken == 0 {
                // The guest has not read its FIFO yet.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
