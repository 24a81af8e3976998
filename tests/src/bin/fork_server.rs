//! `fork-server N PORTFILE PIDFILE [ADDR]`: listens on ADDR (an IP address,
//! 127.0.0.1 unless given; any port), then forks, the way a server's
//! master hands its listener to a worker. The worker
//! answers N HTTP requests, one per connection, with an empty 200 and
//! exits; the master holds the listener too and waits for it. PORTFILE
//! gets the port and PIDFILE the worker's pid, once it accepts.

use std::{
    io::{Read, Write},
    net::TcpListener,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (n, portfile, pidfile, addr) = match args.as_slice() {
        [n, portfile, pidfile] => (n, portfile, pidfile, "127.0.0.1"),
        [n, portfile, pidfile, addr] => (n, portfile, pidfile, addr.as_str()),
        _ => {
            eprintln!("usage: fork-server N PORTFILE PIDFILE [ADDR]");
            std::process::exit(2);
        }
    };
    let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
        eprintln!("fork-server: ADDR must be an IP address");
        std::process::exit(2);
    };
    let Ok(n) = n.parse::<usize>() else {
        eprintln!("fork-server: N must be a number");
        std::process::exit(2);
    };
    if let Err(e) = run(n, portfile, pidfile, addr) {
        eprintln!("fork-server: {e}");
        std::process::exit(1);
    }
}

fn run(n: usize, portfile: &str, pidfile: &str, addr: std::net::IpAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind((addr, 0))?;
    let port = listener.local_addr()?.port();
    // SAFETY: no other thread runs yet.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            let pid = std::process::id();
            std::fs::write(pidfile, pid.to_string())?;
            std::fs::write(portfile, port.to_string())?;
            let code = match serve(&listener, n) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("fork-server worker: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
        worker => {
            let mut status = 0;
            // SAFETY: our own child.
            unsafe { libc::waitpid(worker, &mut status, 0) };
            drop(listener);
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::other("the worker failed"))
            }
        }
    }
}

/// Answers `n` requests, one per connection.
fn serve(listener: &TcpListener, n: usize) -> std::io::Result<()> {
    for _ in 0..n {
        let (mut s, _) = listener.accept()?;
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let got = s.read(&mut buf)?;
            if got == 0 {
                break;
            }
            req.extend_from_slice(&buf[..got]);
        }
        s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    }
    Ok(())
}
