//! AFL++ wrapper: the target is `ggfs_fuzz::targets::tarindex_decode` (what it
//! parses and asserts is said there).

fn main() {
    afl::fuzz!(|data: &[u8]| ggfs_fuzz::targets::tarindex_decode::run(data));
}
