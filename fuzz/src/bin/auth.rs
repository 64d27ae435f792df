//! AFL++ wrapper: the target is `ggfs_fuzz::targets::auth` (what it
//! parses and asserts is said there).

fn main() {
    afl::fuzz!(|data: &[u8]| ggfs_fuzz::targets::auth::run(data));
}
