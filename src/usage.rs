//! Usage errors of the command-line tools (`ggfs`, `ggfs-mountd`) as one
//! line: clap renders them over several, with the usage and a hint.

/// clap's usage error on one line: what is wrong, what is missing, its
/// tip ("a similar subcommand exists"), and where the help is.
pub fn one_line(text: &str) -> String {
    let mut out = String::new();
    let mut command = "ggfs".to_string();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(usage) = line.strip_prefix("Usage: ") {
            command = usage
                .split(' ')
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ");
            break;
        }
        match line.strip_prefix("tip: ") {
            Some(tip) => out.push_str(&format!("; {tip}")),
            None if out.is_empty() => out.push_str(line.trim_start_matches("error: ")),
            None => out.push_str(&format!(" {line}")),
        }
    }
    format!("{out} (see `{command} --help`)")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_what_is_missing_the_tip_and_the_help() {
        let clap = "error: the following required arguments were not provided:\n  <SRC>\n  <DST>\n\nUsage: ggfs copy [OPTIONS] <SRC> <DST>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            super::one_line(clap),
            "the following required arguments were not provided: <SRC> <DST> (see `ggfs copy --help`)"
        );
        let conflict = "error: the argument '--repo <REPO>' cannot be used with '--tag <TAG>'\n\nUsage: ggfs mutate --repo <REPO> <IMAGE>\n";
        assert_eq!(
            super::one_line(conflict),
            "the argument '--repo <REPO>' cannot be used with '--tag <TAG>' (see `ggfs mutate --help`)"
        );
        let typo = "error: unrecognized subcommand 'mout'\n\n  tip: a similar subcommand exists: 'mount'\n\nUsage: ggfs [OPTIONS] <COMMAND>\n";
        assert_eq!(
            super::one_line(typo),
            "unrecognized subcommand 'mout'; a similar subcommand exists: 'mount' (see `ggfs --help`)"
        );
    }
}
