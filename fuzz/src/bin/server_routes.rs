//! AFL++ wrapper: the target is `ggfs_fuzz::targets::server_routes` (what it
//! parses and asserts is said there).

fn main() {
    afl::fuzz!(|data: &[u8]| ggfs_fuzz::targets::server_routes::run(data));
}
