//! `mfn-cli`: face verification with MobileFaceNet from the command line.

mod commands;

// Training frees and reallocates activation-sized buffers every step; mimalloc keeps them
// instead of handing them back to the kernel and faulting them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Face verification with MobileFaceNet.
#[derive(Parser, Debug)]
#[command(name = "mfn-cli", version, about)]
struct Cli {
    /// Threads for the network and image decoding, at most 8 per core (default: all
    /// cores).
    #[arg(long, global = true, allow_negative_numbers = true, value_parser = commands::args::threads)]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the LFW pair protocol (pairs.txt or an insightface `.bin` set): 10-fold
    /// accuracy, ROC, AUC, EER and TAR@FAR.
    Eval(commands::eval::Args),
    /// Writes embeddings of aligned face images as JSON.
    Embed(commands::embed::Args),
    /// Converts a checkpoint (MXNet, ONNX, PyTorch) to the native safetensors format.
    Convert(commands::convert::Args),
    /// Calibrates a model on aligned faces and writes it with its int8 half (the CPU
    /// engine's int8 path).
    Quantize(commands::quantize::Args),
    /// Finds faces in photos and writes them aligned (ArcFace or SphereFace layout).
    Align(commands::align::Args),
    /// Decides whether two photos show the same person: exit 0 yes, 1 no, 2 error.
    Verify(commands::verify::Args),
    /// Packs a pair list and its images as an insightface `.bin` verification set.
    PackBin(commands::pack_bin::Args),
    /// Trains a MobileFaceNet with a margin loss (ArcFace by default), or fine-tunes one.
    Train(Box<commands::train::Args>),
    /// 1:N identification: enroll labelled faces, search, identify (open set), remove,
    /// list, stats, and the LFW open-set protocol.
    Gallery(commands::gallery::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Which options the command line gave, as opposed to their defaults: a resumed run
    // keeps its own settings unless told otherwise.
    let given = |sub: &str| -> Vec<String> {
        matches
            .subcommand_matches(sub)
            .map(|m| {
                m.ids()
                    .filter(|id| {
                        m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
                    })
                    .map(|id| id.as_str().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    if let Some(n) = cli.threads {
        mfn_model::set_num_threads(n);
    }
    let result = match cli.command {
        Command::Eval(args) => commands::eval::run(args).map(|_| 0),
        Command::Embed(args) => commands::embed::run(args).map(|_| 0),
        Command::Convert(args) => commands::convert::run(args).map(|_| 0),
        Command::Quantize(args) => commands::quantize::run(args).map(|_| 0),
        Command::Align(args) => commands::align::run(args).map(|_| 0),
        Command::Verify(args) => commands::verify::run(args).map(|same| if same { 0 } else { 1 }),
        Command::PackBin(args) => commands::pack_bin::run(args).map(|_| 0),
        Command::Train(args) => commands::train::run(*args, &given("train")).map(|_| 0),
        Command::Gallery(args) => commands::gallery::run(args).map(|_| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
