use clap::Parser;
use threadgate::config::{Command, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(Command::Openapi) = config.command {
        print!("{}", threadgate::http::openapi_json());
        return Ok(());
    }
    threadgate::app::init_tracing(config.log_format);
    threadgate::app::run(config).await
}
