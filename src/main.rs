use std::process::ExitCode;

use clap::Parser;
use usher::config::{Cli, Command, HealthArgs, ServeArgs};

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Health(args) => health(args).await,
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("usher serve: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = usher::telemetry::init(config.log_format, &config.log) {
        eprintln!("usher serve: {error}");
        return ExitCode::from(2);
    }
    match usher::server::serve(config, usher::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "usher could not start");
            ExitCode::FAILURE
        }
    }
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
