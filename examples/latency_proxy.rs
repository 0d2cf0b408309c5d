//! A TCP proxy that delays every byte by a fixed time in each direction: a long link between the
//! gateway and its S3 endpoint, for `scripts/bench.sh` (issue 11: direct and edge mode over a
//! 20 ms link). Only latency is added; bandwidth is whatever the two local ends manage.
//!
//! ```sh
//! cargo run --release --example latency_proxy -- LISTEN_PORT TARGET_HOST:PORT DELAY_MS
//! ```

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The most one read takes off a socket; each read becomes one delayed write (under glibc's
/// mmap threshold, so a chunk's allocation is reused rather than mapped afresh).
const READ_SIZE: usize = 64 * 1024;

/// The proxy's command line: where it listens, where it forwards, and the one-way delay.
struct Args {
    listen_port: u16,
    target: String,
    delay: Duration,
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: latency_proxy LISTEN_PORT TARGET_HOST:PORT DELAY_MS";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, target, delay] = args.as_slice() else {
        return Err(usage.into());
    };
    Ok(Args {
        listen_port: port.parse().map_err(|_| usage.to_string())?,
        target: target.clone(),
        delay: Duration::from_millis(delay.parse().map_err(|_| usage.to_string())?),
    })
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(("127.0.0.1", args.listen_port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{}: {e}", args.listen_port);
            std::process::exit(1);
        }
    };
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (target, delay) = (args.target.clone(), args.delay);
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                relay(client_read, server_write, delay),
                relay(server_read, client_write, delay)
            );
        });
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read. Reading goes on while
/// earlier chunks wait, so the link is delayed, not slowed.
async fn relay(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` tells the writer the stream ended, after what is queued.
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(delay).await;
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
