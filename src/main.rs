fn main() {
    // PLACEHOLDER: the daemon entry point (see usnetd::daemon).
    eprintln!("usnetd: not yet wired");
    std::process::exit(1);
}
