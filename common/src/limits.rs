//! The process limit every serving component raises when it starts: open files.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The open-files limit of this process, before and after [`raise_open_files_limit`];
/// `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit the process started with.
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime does when a
/// program starts, and logs it. Distributions leave the soft limit at 1,024 (systemd's
/// default for services) while the hard limit allows hundreds of times more; a proxy holds
/// a client and an upstream socket for every request in flight, and with 1,024 it would
/// refuse connections (`EMFILE`) at about 500 of them. The hard limit stays as the
/// administrator set it.
pub fn raise_open_files_limit() -> OpenFiles {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if before.is_none() || before == limit.maximum {
        return OpenFiles {
            before,
            now: before,
        };
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            let now = getrlimit(Resource::Nofile).current;
            tracing::info!(
                from = %shown(before),
                to = %shown(now),
                "raised the open files limit"
            );
            OpenFiles { before, now }
        }
        Err(e) => {
            tracing::warn!(
                limit = %shown(before),
                error = %e,
                "could not raise the open files limit"
            );
            OpenFiles {
                before,
                now: before,
            }
        }
    }
}

/// A limit as a person reads it.
fn shown(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let start = getrlimit(Resource::Nofile);
        let hard = start
            .maximum
            .expect("Linux always has a hard limit on open files");
        let low = hard.min(1024);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(low),
                maximum: start.maximum,
            },
        )
        .unwrap();
        let got = raise_open_files_limit();
        assert_eq!(got.before, Some(low));
        assert_eq!(got.now, Some(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        assert_eq!(
            getrlimit(Resource::Nofile).maximum,
            Some(hard),
            "the hard limit stays"
        );
        // Already at the hard limit: nothing to do.
        assert_eq!(
            raise_open_files_limit(),
            OpenFiles {
                before: Some(hard),
                now: Some(hard)
            }
        );
    }
}
