use std::process::ExitCode;

use clap::Parser;
use usher::config::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
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
    }
}
