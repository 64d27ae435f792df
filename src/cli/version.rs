use anyhow::Result;

pub fn run() -> Result<()> {
    println!("ggfs {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
