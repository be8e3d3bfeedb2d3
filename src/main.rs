use std::process::ExitCode;

use clap::Parser;
use usher::config::{Cli, Command, DeviceArgs, HealthArgs, KeysCommand, ServeArgs};
use usher::token::keys::{KeyError, KeySet};

/// See Cargo.toml: the allocator the benchmarks measure with too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Health(args) => health(args).await,
        Command::Keys(command) => keys(command),
        Command::Device(args) => device(args).await,
        Command::Bench(args) => bench(*args).await,
        Command::Soak(args) => soak(*args).await,
        Command::Relay(args) => relay(*args).await,
    }
}

async fn bench(args: usher::config::BenchArgs) -> ExitCode {
    let json = args.json;
    match usher::bench::run(args).await {
        Ok(report) if json => {
            println!("{:#}", report.json());
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("usher bench: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn soak(args: usher::config::SoakArgs) -> ExitCode {
    let json = args.json;
    match usher::soak::run(args).await {
        Ok(report) => {
            if json {
                println!("{:#}", report.json());
            } else {
                print!("{}", report.table());
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("usher soak: {error}");
            ExitCode::from(2)
        }
    }
}

async fn device(args: DeviceArgs) -> ExitCode {
    let tls = match &args.tls_ca {
        Some(path) => match std::fs::read(path) {
            Ok(ca) => Some((ca, args.tls_domain.clone())),
            Err(error) => {
                eprintln!("usher device: {}: {error}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let options = usher::streaming::device::DeviceOptions {
        url: format!("{scheme}://{}", args.addr),
        token: args.token,
        position: args.position,
        interval: args.interval,
        stop_after: args.stop_after,
        paused: args.paused,
        duration: args.duration,
        tls,
    };
    let printed = usher::streaming::device::run(options, |line| println!("{line}")).await;
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("usher device: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Why `usher keys` did nothing.
#[derive(Debug, thiserror::Error)]
enum KeysError {
    #[error("{} exists: pass --force to replace it", .0.display())]
    Exists(std::path::PathBuf),
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn keys(command: KeysCommand) -> ExitCode {
    let result: Result<(), KeysError> = match command {
        KeysCommand::Generate(args) => {
            if args.out.exists() && !args.force {
                Err(KeysError::Exists(args.out))
            } else {
                KeySet::generate(args.algorithm).and_then(|set| {
                    set.write(&args.out)?;
                    println!(
                        "wrote {} (active key {})",
                        args.out.display(),
                        set.keys[0].kid
                    );
                    Ok(())
                })
                .map_err(KeysError::from)
            }
        }
        KeysCommand::Rotate(args) => KeySet::read(&args.file).and_then(|mut set| {
            set.rotate(args.algorithm, args.keep_retired)?;
            set.write(&args.file)?;
            let active = set.keys.last().map(|k| k.kid.as_str()).unwrap_or_default();
            println!(
                "rotated {}: active key {active}, {} key(s) in the set; running servers reload it",
                args.file.display(),
                set.keys.len()
            );
            Ok(())
        })
        .map_err(KeysError::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("usher keys: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    // First: a SIGTERM from now on drains the server instead of killing the process.
    let signal = usher::server::shutdown_signal();
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("usher serve: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match usher::telemetry::init(
        config.log_format,
        &config.log,
        config.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("usher serve: {error}");
            return ExitCode::from(2);
        }
    };
    let code = match usher::server::serve(config, signal).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "usher could not start");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

async fn relay(args: usher::config::RelayArgs) -> ExitCode {
    let signal = usher::server::shutdown_signal();
    let status = args.status;
    let config = match args.serve.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("usher relay: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match usher::telemetry::init(config.log_format, &config.log, None) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("usher relay: {error}");
            return ExitCode::from(2);
        }
    };
    let code = match usher::server::relay(config, status, signal).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "usher relay could not run");
            eprintln!("usher relay: {error}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

async fn health(args: HealthArgs) -> ExitCode {
    match usher::server::check_health(&args).await {
        Ok(status) => {
            println!("{status}");
            if status == "SERVING" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("usher health: {error}");
            ExitCode::FAILURE
        }
    }
}
