//! `recache`: run one command through the remote cache.

fn main() {
    eprintln!("recache: the `run` command is not implemented yet (see README.md for the status)");
    std::process::exit(2);
}
