//! Secret files sealed with ChaCha20-Poly1305 under a key read from a file, so that etcd
//! (and its backups) never hold a secret in plaintext.
//!
//! Each value gets a fresh random 96-bit nonce. The associated data binds a ciphertext to
//! its app, proc and path, so a record copied to another key fails to open instead of
//! leaking into another app's container. Neither the key nor a plaintext is ever logged:
//! [`SecretBox`] prints only its key id.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use lain_state::SCHEMA_VERSION;
use lain_state::records::SecretRecord;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The algorithm name stored in each record.
pub const ALG: &str = "chacha20poly1305";

/// Why a secret key or value could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key file cannot be read or written.
    #[error("secret key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("secret key file {0} must hold 64 hex digits (a 32-byte key)")]
    BadKey(String),
    /// A record was sealed with another key or algorithm.
    #[error("secret was sealed with key {0:?} ({1}), not this cluster's key")]
    WrongKey(String, String),
    /// A record does not open: corrupted, or moved to another key.
    #[error("secret does not decrypt (corrupted or moved)")]
    Open,
}

/// The cluster's secret key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
    key_id: String,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SecretBox {
    /// A box from raw key bytes.
    pub fn from_key(key: [u8; 32]) -> SecretBox {
        let digest = Sha256::digest(key);
        SecretBox {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            key_id: hex::encode(&digest[..8]),
        }
    }

    /// Reads the key file: 64 hex digits, surrounding whitespace ignored.
    pub fn load(path: &Path) -> Result<SecretBox, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let bytes = hex::decode(text.trim())
            .map_err(|_| SecretError::BadKey(path.display().to_string()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SecretError::BadKey(path.display().to_string()))?;
        Ok(SecretBox::from_key(key))
    }

    /// Creates a new random key file readable only by its owner (0600); an existing file is
    /// kept, since replacing it would make every stored secret unreadable.
    pub fn create_key_file(path: &Path) -> Result<bool, SecretError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        if path.exists() {
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(format!("{}\n", hex::encode(key)).as_bytes())
            .map_err(io)?;
        Ok(true)
    }

    /// The key's id: the first 8 bytes of its SHA-256, in hex.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn aad(app: &str, proc_name: &str, path: &str) -> Vec<u8> {
        format!("lain-secret\0{app}\0{proc_name}\0{path}").into_bytes()
    }

    /// Seals `plaintext` for `app`/`proc_name` at `path`.
    pub fn seal(
        &self,
        app: &str,
        proc_name: &str,
        path: &str,
        plaintext: &[u8],
        updated_at: String,
    ) -> SecretRecord {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let aad = Self::aad(app, proc_name, path);
        // Encryption with a valid key and nonce only fails for inputs beyond 256 GiB, which
        // the body limit rules out; an empty ciphertext would then fail to open, never leak.
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        SecretRecord {
            v: SCHEMA_VERSION,
            path: path.to_string(),
            alg: ALG.into(),
            key_id: self.key_id.clone(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ciphertext),
            updated_at,
        }
    }

    /// Opens a record stored for `app`/`proc_name`.
    pub fn open(
        &self,
        app: &str,
        proc_name: &str,
        rec: &SecretRecord,
    ) -> Result<Vec<u8>, SecretError> {
        if rec.alg != ALG || rec.key_id != self.key_id {
            return Err(SecretError::WrongKey(rec.key_id.clone(), rec.alg.clone()));
        }
        let nonce = B64.decode(&rec.nonce).map_err(|_| SecretError::Open)?;
        let ciphertext = B64.decode(&rec.ciphertext).map_err(|_| SecretError::Open)?;
        if nonce.len() != 12 {
            return Err(SecretError::Open);
        }
        let aad = Self::aad(app, proc_name, &rec.path);
        self.cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Open)
    }
}

/// The plaintext size of a sealed record: the ciphertext less its 16-byte tag.
pub fn sealed_size(rec: &SecretRecord) -> u64 {
    let len = B64.decode(&rec.ciphertext).map(|c| c.len()).unwrap_or(16);
    len.saturating_sub(16) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let b = SecretBox::from_key([7; 32]);
        let rec = b.seal("a", "web", "/lain/app/x", b"hunter2", "t".into());
        assert!(!rec.ciphertext.contains("hunter2"));
        assert_eq!(b.open("a", "web", &rec).unwrap(), b"hunter2");
        assert_eq!(sealed_size(&rec), 7);
        // Moved to another app, the record does not open.
        assert!(matches!(b.open("b", "web", &rec), Err(SecretError::Open)));
        let other = SecretBox::from_key([8; 32]);
        assert!(matches!(
            other.open("a", "web", &rec),
            Err(SecretError::WrongKey(..))
        ));
        assert!(!format!("{b:?}").contains("07"));
    }

    #[test]
    fn key_file_is_created_once_with_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/secret.key");
        assert!(SecretBox::create_key_file(&path).unwrap());
        assert!(!SecretBox::create_key_file(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = SecretBox::load(&path).unwrap();
        assert_eq!(b.key_id().len(), 16);
        std::fs::write(&path, "nothex").unwrap();
        assert!(matches!(
            SecretBox::load(&path),
            Err(SecretError::BadKey(_))
        ));
    }
}
