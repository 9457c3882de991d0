//! Source addresses: each simulated device binds one before connecting, so that N devices
//! are not limited by the ~28k ephemeral ports one (source IP, destination) pair allows.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use anyhow::{Context, Result, bail};

/// First address a `--sources COUNT` starts from (127.0.0.1 is left to the server).
pub const FIRST_LOOPBACK_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Devices per source address the default plan aims for. One (source, destination) pair
/// has the 28,232 ports of the default `ip_local_port_range`, but the kernel's search for a
/// free port slows as they fill: measured here, one source slowed the ramp from ~600 to
/// <100 connects/s past ~15,000 devices, four sources for the same 19,500 did not.
/// Loopback addresses cost nothing, so stay under a fifth of the range.
pub const DEVICES_PER_SOURCE: u64 = 5_000;

/// Upper bound on the number of source addresses (a sanity limit on ranges).
const MAX_SOURCES: u64 = 4096;

/// What `--sources` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `N`: 127.0.0.2, 127.0.0.3, … (N addresses).
    Count(u64),
    /// `A-B`: every IPv4 address from A to B inclusive.
    Range(Ipv4Addr, Ipv4Addr),
    /// `A,B,C` or a single address.
    List(Vec<IpAddr>),
    /// `none`: do not bind; the kernel picks the source address.
    Kernel,
}

impl FromStr for SourceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("kernel") {
            return Ok(Self::Kernel);
        }
        if let Ok(count) = s.parse::<u64>() {
            if count == 0 || count > MAX_SOURCES {
                bail!("source count must be 1..={MAX_SOURCES}, got {count}");
            }
            return Ok(Self::Count(count));
        }
        if let Some((from, to)) = s.split_once('-') {
            let from: Ipv4Addr = from
                .trim()
                .parse()
                .with_context(|| format!("bad IPv4 address '{from}' in range '{s}'"))?;
            let to: Ipv4Addr = to
                .trim()
                .parse()
                .with_context(|| format!("bad IPv4 address '{to}' in range '{s}'"))?;
            if u32::from(to) < u32::from(from) {
                bail!("source range '{s}' runs backwards");
            }
            if u64::from(u32::from(to) - u32::from(from)) >= MAX_SOURCES {
                bail!("source range '{s}' holds more than {MAX_SOURCES} addresses");
            }
            return Ok(Self::Range(from, to));
        }
        let list = s
            .split(',')
            .map(|a| {
                a.trim()
                    .parse::<IpAddr>()
                    .with_context(|| format!("bad source address '{a}': expected N, A-B or A,B,…"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::List(list))
    }
}

impl SourceSpec {
    /// The addresses this spec names (empty for [`SourceSpec::Kernel`]).
    pub fn addresses(&self) -> Vec<IpAddr> {
        match self {
            Self::Count(n) => (0..*n)
                .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(FIRST_LOOPBACK_SOURCE) + i as u32)))
                .collect(),
            Self::Range(from, to) => (u32::from(*from)..=u32::from(*to))
                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                .collect(),
            Self::List(list) => list.clone(),
            Self::Kernel => Vec::new(),
        }
    }

    /// The default for `devices` devices against `target`: loopback targets get
    /// ceil(devices / 5,000) addresses from 127.0.0.2; other targets let the kernel choose.
    pub fn default_for(target: IpAddr, devices: u64) -> Self {
        if target.is_loopback() && target.is_ipv4() {
            Self::Count(devices.div_ceil(DEVICES_PER_SOURCE).clamp(1, MAX_SOURCES))
        } else {
            Self::Kernel
        }
    }
}

/// Checks that `sources` can reach `target`, and that no source needs more ports than the
/// kernel's ephemeral range holds (`port_count`, if known). Returns warnings.
pub fn check(
    sources: &[IpAddr],
    target: IpAddr,
    devices: u64,
    port_count: Option<u64>,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for source in sources {
        if source.is_ipv4() != target.is_ipv4() {
            bail!("source address {source} and target {target} are different IP families");
        }
        if source.is_loopback() && !target.is_loopback() {
            bail!(
                "source address {source} is a loopback address and cannot reach {target}; \
                 pass --sources none (or addresses of this host)"
            );
        }
    }
    let per_source = devices.div_ceil(sources.len().max(1) as u64);
    if let Some(ports) = port_count {
        let label = if sources.is_empty() {
            "the kernel-chosen source address".to_owned()
        } else {
            format!("each of {} source address(es)", sources.len())
        };
        if per_source > ports {
            bail!(
                "{devices} devices need {per_source} ports on {label}, but the ephemeral port \
                 range holds {ports}: spread them over more --sources (e.g. --sources {})",
                devices.div_ceil(DEVICES_PER_SOURCE)
            );
        }
        if per_source * 2 > ports {
            warnings.push(format!(
                "{per_source} devices per source address use over half of the {ports} ephemeral \
                 ports: the kernel's port search slows the ramp down (use more --sources)"
            ));
        }
    }
    Ok(warnings)
}

/// The source address of device `id` (devices are dealt round-robin over the sources).
pub fn source_for(sources: &[IpAddr], id: u64) -> Option<IpAddr> {
    (!sources.is_empty()).then(|| sources[(id % sources.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_count_range_list_and_none() {
        assert_eq!(
            "3".parse::<SourceSpec>().unwrap().addresses(),
            [v4("127.0.0.2"), v4("127.0.0.3"), v4("127.0.0.4")]
        );
        let range: SourceSpec = "127.0.0.2-127.0.0.9".parse().unwrap();
        let addrs = range.addresses();
        assert_eq!(addrs.len(), 8);
        assert_eq!((addrs[0], addrs[7]), (v4("127.0.0.2"), v4("127.0.0.9")));
        let across_octet: SourceSpec = "127.0.0.254-127.0.1.1".parse().unwrap();
        assert_eq!(across_octet.addresses().len(), 4);
        assert_eq!(
            "127.0.0.5,127.0.0.7"
                .parse::<SourceSpec>()
                .unwrap()
                .addresses()
                .len(),
            2
        );
        assert_eq!("none".parse::<SourceSpec>().unwrap(), SourceSpec::Kernel);
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "0",
            "127.0.0.9-127.0.0.2",
            "127.0.0.1-",
            "hello",
            "10.0.0.0-10.1.0.0",
        ] {
            assert!(
                bad.parse::<SourceSpec>().is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn default_scales_with_devices_on_loopback_only() {
        let lo = v4("127.0.0.1");
        assert_eq!(SourceSpec::default_for(lo, 2_000), SourceSpec::Count(1));
        assert_eq!(SourceSpec::default_for(lo, 5_001), SourceSpec::Count(2));
        assert_eq!(SourceSpec::default_for(lo, 100_000), SourceSpec::Count(20));
        assert_eq!(
            SourceSpec::default_for(v4("10.1.2.3"), 100_000),
            SourceSpec::Kernel
        );
    }

    #[test]
    fn deals_devices_round_robin() {
        let sources = [v4("127.0.0.2"), v4("127.0.0.3")];
        assert_eq!(source_for(&sources, 0), Some(sources[0]));
        assert_eq!(source_for(&sources, 1), Some(sources[1]));
        assert_eq!(source_for(&sources, 4), Some(sources[0]));
        assert_eq!(source_for(&[], 4), None);
    }

    #[test]
    fn refuses_more_devices_per_source_than_ports() {
        let lo = v4("127.0.0.1");
        let one = [v4("127.0.0.2")];
        assert!(check(&one, lo, 30_000, Some(28_232)).is_err());
        assert!(check(&one, lo, 14_000, Some(28_232)).unwrap().is_empty());
        assert_eq!(check(&one, lo, 20_000, Some(28_232)).unwrap().len(), 1);
        let five: Vec<IpAddr> = SourceSpec::Count(5).addresses();
        assert!(check(&five, lo, 70_000, Some(28_232)).unwrap().is_empty());
        assert!(check(&one, v4("10.0.0.1"), 10, None).is_err());
    }
}
