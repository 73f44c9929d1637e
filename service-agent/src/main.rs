//! `service-agent`: see `service-agent --help`.

use clap::Parser as _;
use service_agent::{
    cli::{Cli, Command},
    ops::{list, trace},
    run,
};

fn main() -> anyhow::Result<()> {
    // One malloc arena: the agent's work is one thread at a time (the sync
    // loop, the file parser, a scrape), and with glibc's default of an
    // arena per thread, memory the parser frees stays in its arena: 5% more
    // peak memory at 100k Services, for nothing.
    // SAFETY: called before any other thread exists; mallopt only tunes
    // the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let options = args.options()?;
            // The library's error converts into anyhow's, which prints
            // its whole chain.
            Ok(tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run::run(options))?)
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
        Command::Trace(args) => {
            let traced = trace::trace(&args.request()?)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&traced)?);
            } else {
                print!("{}", trace::render::render_text(&traced));
            }
            Ok(())
        }
    }
}
