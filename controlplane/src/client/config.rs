//! The CLI's configuration file (`$LAIN_CONFIG`, by default `~/.config/lain/config.toml`),
//! written by `lain login`, and how the server address and token are chosen: a flag, then
//! the environment (`LAIN_SERVER`, `LAIN_TOKEN`, which clap reads into the flags), then the
//! file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CliError;

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The API's base URL, e.g. `http://127.0.0.1:9100`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The Docker engine `lain build` uses when neither `--docker-host` nor `DOCKER_HOST`
    /// is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_host: Option<String>,
}

/// Where the file is: `$LAIN_CONFIG`, else `$XDG_CONFIG_HOME/lain/config.toml`, else
/// `~/.config/lain/config.toml`.
pub fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LAIN_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(x).join("lain/config.toml");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".config/lain/config.toml")
}

impl ClientConfig {
    /// Reads the file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<ClientConfig, CliError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ClientConfig::default());
            }
            Err(e) => {
                return Err(CliError::local(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        toml::from_str(&text).map_err(|e| {
            CliError::local(format!(
                "{} is not a valid lain CLI config: {}; fix it or run `lain login` again",
                path.display(),
                e.message()
            ))
        })
    }

    /// Writes the file readable by its owner only, since it holds a token.
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        let fail =
            |e: std::io::Error| CliError::failed(format!("cannot write {}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let text = toml::to_string(self)
            .map_err(|e| CliError::failed(format!("cannot encode the config: {e}")))?;
        let tmp = path.with_extension("toml.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(fail)?;
            f.write_all(text.as_bytes()).map_err(fail)?;
        }
        std::fs::rename(&tmp, path).map_err(fail)
    }
}

/// Makes a server address a base URL: `host:port` gets `http://`, trailing slashes go.
pub fn normalize_server(s: &str) -> Result<String, CliError> {
    let s = s.trim().trim_end_matches('/');
    if s.is_empty() {
        return Err(CliError::usage("the server address is empty"));
    }
    let url = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::usage(format!(
            "server {s:?} must be an http:// or https:// URL"
        )));
    }
    Ok(url)
}

/// The server and token a command uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The API's base URL.
    pub server: String,
    /// The bearer token.
    pub token: String,
}

/// Chooses the server and token: the flag (or its environment variable), then the file.
pub fn resolve(
    server_flag: Option<&str>,
    token_flag: Option<&str>,
    file: &ClientConfig,
) -> Result<Target, CliError> {
    let server = server_flag
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| file.server.clone())
        .ok_or_else(|| {
            CliError::usage(
                "no server configured: run `lain login --server URL --token TOKEN`, or pass --server / set LAIN_SERVER",
            )
        })?;
    let token = token_flag
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| file.token.clone())
        .ok_or_else(|| {
            CliError::auth(
                "no token configured: run `lain login --server URL --token TOKEN`, or pass --token / set LAIN_TOKEN",
            )
        })?;
    Ok(Target {
        server: normalize_server(&server)?,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file = ClientConfig {
            server: Some("127.0.0.1:9100".into()),
            token: Some("file-token".into()),
            docker_host: None,
        };
        let t = resolve(None, None, &file).unwrap();
        assert_eq!(t.server, "http://127.0.0.1:9100");
        assert_eq!(t.token, "file-token");
        let t = resolve(Some("https://lain.example/"), Some("flag"), &file).unwrap();
        assert_eq!(t.server, "https://lain.example");
        assert_eq!(t.token, "flag");
        let e = resolve(None, None, &ClientConfig::default()).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("lain login"));
        let e = resolve(Some("x:1"), None, &ClientConfig::default()).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(normalize_server("ftp://x").is_err());
    }

    #[test]
    fn the_file_round_trips_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let c = ClientConfig {
            server: Some("http://127.0.0.1:1".into()),
            token: Some("t".into()),
            docker_host: None,
        };
        c.save(&path).unwrap();
        assert_eq!(ClientConfig::load(&path).unwrap(), c);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "server = 1\nbogus = 2\n").unwrap();
        let e = ClientConfig::load(&path).unwrap_err();
        assert_eq!(e.code, 64);
        assert_eq!(
            ClientConfig::load(&dir.path().join("missing.toml")).unwrap(),
            ClientConfig::default()
        );
    }
}
