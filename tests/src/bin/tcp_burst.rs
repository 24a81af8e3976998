//! `tcp-burst N PORTFILE`: opens N sequential TCP connections to its own
//! listener on 127.0.0.1 (each sends "ping", reads "pong", closes), after
//! writing the listener's port to PORTFILE. A bounded, self-contained
//! workload for recording tests.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(n), Some(portfile)) = (args.next(), args.next()) else {
        eprintln!("usage: tcp-burst N PORTFILE");
        std::process::exit(2);
    };
    let Ok(n) = n.parse::<usize>() else {
        eprintln!("tcp-burst: N must be a number");
        std::process::exit(2);
    };
    if let Err(e) = run(n, &portfile) {
        eprintln!("tcp-burst: {e}");
        std::process::exit(1);
    }
}

fn run(n: usize, portfile: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::fs::write(portfile, port.to_string())?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..n {
            let (mut s, _) = listener.accept()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            s.write_all(b"pong")?;
        }
        Ok(())
    });
    for _ in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf)?;
    }
    server
        .join()
        .map_err(|_| std::io::Error::other("server thread panicked"))?
}
