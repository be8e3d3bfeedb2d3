//! Token validation cost, measured side by side in one run: `cargo bench --bench tokens`.
//!
//! 1. In process: one verification of a playback token per algorithm (EdDSA, HS256),
//!    uncached (a signature check) and cached (a lookup plus the time checks).
//! 2. Through the real server on loopback: ValidateToken calls per second from concurrent
//!    clients, with the cache (one token checked again and again, as a CDN does for every
//!    segment) and without it (cache disabled), and with `check_session`.
//!
//! It reports numbers and ratios; it never fails on a timing.

#[path = "support/mod.rs"]
#[expect(dead_code, reason = "shared by the benches; this one uses part of it")]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use usher::config::Config;
use usher::entitlement::StaticPolicy;
use usher::proto;
use usher::proto::playback_session_service_client::PlaybackSessionServiceClient;
use usher::proto::token_service_client::TokenServiceClient;
use usher::server::Components;
use usher::store::StoreSettings;
use usher::store::memory::MemoryStore;
use usher::token::keys::{KeyAlgorithm, KeyRing, KeySet};
use usher::token::{TokenSettings, Tokens};

const IN_PROCESS: u32 = 20_000;
const CLIENTS: usize = 32;
const RUN: Duration = Duration::from_secs(3);

fn tokens(algorithm: KeyAlgorithm, cache_capacity: u64) -> Tokens {
    let ring = KeyRing::from_set(&KeySet::generate(algorithm).unwrap(), Duration::ZERO).unwrap();
    Tokens::new(
        TokenSettings {
            cache_capacity,
            ..TokenSettings::default()
        },
        ring,
    )
}

fn sample_session() -> usher::session::Session {
    usher::session::Session::sample(
        usher::ids::SessionName::parse("n", "users/bench/sessions/s-1").unwrap(),
        usher::ids::DeviceId::parse("d", "tv").unwrap(),
        0,
    )
}

/// Nanoseconds per verification.
fn per_verify(tokens: &Tokens, token: &str) -> f64 {
    tokens.verify(token).expect("a valid token");
    let started = Instant::now();
    for _ in 0..IN_PROCESS {
        std::hint::black_box(tokens.verify(std::hint::black_box(token)).unwrap());
    }
    started.elapsed().as_nanos() as f64 / f64::from(IN_PROCESS)
}

fn in_process() {
    println!("in process, {IN_PROCESS} verifications each (ns per verification)");
    println!(
        "{:<8} {:>12} {:>12} {:>10}",
        "alg", "uncached", "cached", "ratio"
    );
    for algorithm in [KeyAlgorithm::Eddsa, KeyAlgorithm::Hs256] {
        let uncached_tokens = tokens(algorithm, 0);
        let token = uncached_tokens
            .issue(&sample_session(), &Default::default())
            .unwrap()
            .token;
        let uncached = per_verify(&uncached_tokens, &token);
        let cached_tokens = tokens(algorithm, 10_000);
        let token = cached_tokens
            .issue(&sample_session(), &Default::default())
            .unwrap()
            .token;
        let cached = per_verify(&cached_tokens, &token);
        println!(
            "{:<8} {:>12.0} {:>12.0} {:>9.1}x",
            format!("{algorithm:?}"),
            uncached,
            cached,
            uncached / cached
        );
    }
}

/// Signing, in process: usher's signer (the key parsed once) beside `jsonwebtoken::encode`
/// with the same Ed25519 key as PKCS#8 (parsed again for every token, as usher signed
/// before), on the same claims. Both tokens verify with usher's verifier.
fn signing() {
    use base64::Engine as _;
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    let set = KeySet::generate(KeyAlgorithm::Eddsa).unwrap();
    let tokens = Tokens::new(
        TokenSettings::default(),
        KeyRing::from_set(&set, Duration::ZERO).unwrap(),
    );
    let issued = tokens
        .issue(&sample_session(), &Default::default())
        .unwrap();
    let seed: [u8; 32] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(set.keys[0].d.as_ref().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let der = ed25519_dalek::SigningKey::from_bytes(&seed)
        .to_pkcs8_der()
        .unwrap();
    let encoding = jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.typ = Some(usher::token::TOKEN_TYPE.to_owned());
    header.kid = Some(set.keys[0].kid.clone());
    let reparsed = jsonwebtoken::encode(&header, &issued.claims, &encoding).unwrap();
    tokens
        .verify(&reparsed)
        .expect("the PKCS#8 path's token verifies too");
    let time = |sign: &dyn Fn() -> String| {
        let started = Instant::now();
        for _ in 0..IN_PROCESS {
            std::hint::black_box(sign());
        }
        started.elapsed().as_nanos() as f64 / f64::from(IN_PROCESS)
    };
    let signer = &tokens;
    let ours = time(&|| {
        signer
            .issue(&sample_session(), &Default::default())
            .unwrap()
            .token
    });
    let theirs = time(&|| jsonwebtoken::encode(&header, &issued.claims, &encoding).unwrap());
    println!("signing, {IN_PROCESS} EdDSA tokens each (ns per token)");
    println!(
        "   issue (key parsed once) {ours:>8.0}   jsonwebtoken::encode from PKCS#8 {theirs:>8.0}   ratio {:.2}x",
        theirs / ours
    );
}

/// Calls per second of ValidateToken from CLIENTS concurrent clients for RUN.
async fn throughput(
    client: TokenServiceClient<tonic::transport::Channel>,
    token: &str,
    check_session: bool,
) -> f64 {
    let deadline = Instant::now() + RUN;
    let workers = (0..CLIENTS).map(|_| {
        let mut client = client.clone();
        let request = proto::ValidateTokenRequest {
            token: token.to_owned(),
            check_session,
        };
        tokio::spawn(async move {
            let mut calls = 0u64;
            while Instant::now() < deadline {
                let answer = client
                    .validate_token(request.clone())
                    .await
                    .unwrap()
                    .into_inner();
                assert!(answer.valid, "{}", answer.reason);
                calls += 1;
            }
            calls
        })
    });
    let started = Instant::now();
    let mut total = 0;
    for worker in workers {
        total += worker.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

async fn server(
    algorithm: KeyAlgorithm,
    cache_capacity: u64,
) -> (usher::server::RunningServer, String) {
    let mut config = Config::defaults();
    config.insecure_dev = true;
    config.limits.drain_delay = Duration::ZERO;
    let components = Components {
        store: Arc::new(MemoryStore::new(StoreSettings::default())),
        entitlements: Arc::new(StaticPolicy::open(2).unwrap()),
        tokens: Arc::new(tokens(algorithm, cache_capacity)),
        credentials: usher::auth::Credentials::default(),
        manifests: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = usher::server::start(&config, components, listener)
        .await
        .unwrap();
    let url = format!("http://{}", running.addr);
    (running, url)
}

async fn through_the_server() {
    println!();
    println!(
        "through the server on loopback: ValidateToken calls/s, {CLIENTS} concurrent clients, {}s each",
        RUN.as_secs()
    );
    println!(
        "{:<8} {:>12} {:>12} {:>10} {:>16}",
        "alg", "uncached", "cached", "ratio", "cached+session"
    );
    for algorithm in [KeyAlgorithm::Eddsa, KeyAlgorithm::Hs256] {
        let mut results = Vec::new();
        for (cache_capacity, check_session) in [(0, false), (10_000, false), (10_000, true)] {
            let (running, url) = server(algorithm, cache_capacity).await;
            let channel = tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let created = PlaybackSessionServiceClient::new(channel.clone())
                .create_session(support::create_request("bench", "tv"))
                .await
                .unwrap()
                .into_inner();
            let rate = throughput(
                TokenServiceClient::new(channel),
                &created.playback_token,
                check_session,
            )
            .await;
            results.push(rate);
            running.shutdown().await.unwrap();
        }
        println!(
            "{:<8} {:>12.0} {:>12.0} {:>9.2}x {:>16.0}",
            format!("{algorithm:?}"),
            results[0],
            results[1],
            results[1] / results[0],
            results[2]
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo test --benches` asks for the list of tests: there are none.
        return;
    }
    in_process();
    signing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(through_the_server());
}
