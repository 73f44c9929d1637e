//! `service-agent`: see `service-agent --help`.

use clap::Parser as _;
use service_agent::{
    cli::{Cli, Command},
    ops::list,
    run,
};

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let options = args.options()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run::run(options))
        }
        Command::List(args) => {
            let listing = list::read_listing(&args.pin_path)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", list::render_table(&listing));
            }
            Ok(())
        }
    }
}
