//! Sites at real city coordinates and the network delay between them.

use postai_core::router::Zone;

pub const SITES_CSV: &str = include_str!("../../scenarios/sites.csv");

#[derive(Clone, Debug)]
pub struct Place {
    pub name: String,
    pub zone: Zone,
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, thiserror::Error)]
#[error("sites.csv line {line}: {reason}")]
pub struct SitesError {
    pub line: usize,
    pub reason: String,
}

pub fn parse_sites(text: &str) -> Result<Vec<Place>, SitesError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: &str| SitesError { line: i + 1, reason: reason.to_string() };
        let cols: Vec<&str> = line.split(',').collect();
        let [name, _country, lat, lon, region] = cols.as_slice() else { return Err(err("expected 5 columns")) };
        let lat: f64 = lat.parse().map_err(|_| err("bad latitude"))?;
        let lon: f64 = lon.parse().map_err(|_| err("bad longitude"))?;
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Err(err("coordinates out of range"));
        }
        let zone = Zone::parse(region).ok_or_else(|| err("region must be EU, US or APAC"))?;
        out.push(Place { name: name.to_string(), zone, lat, lon });
    }
    Ok(out)
}

/// Great-circle distance in km.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// The regional hubs (Hyperdrive pools and L3) and the database nodes.
pub fn hub(zone: Zone) -> Place {
    let (name, lat, lon) = match zone {
        Zone::Eu => ("Frankfurt", 50.1109, 8.6821),
        Zone::Us => ("Ashburn", 39.0438, -77.4874),
        Zone::Apac => ("Singapore", 1.3521, 103.8198),
    };
    Place { name: name.into(), zone, lat, lon }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_file_is_complete() {
        let sites = parse_sites(SITES_CSV).expect("sites.csv parses");
        assert_eq!(sites.len(), 300);
        for z in Zone::ALL {
            assert!(sites.iter().filter(|s| s.zone == z).count() >= 50);
        }
    }

    #[test]
    fn bad_rows_are_errors() {
        assert!(parse_sites("h\nA,DE,1,2\n").is_err());
        assert!(parse_sites("h\nA,DE,x,2,EU\n").is_err());
        assert!(parse_sites("h\nA,DE,91,2,EU\n").is_err());
        assert!(parse_sites("h\nA,DE,1,2,MARS\n").is_err());
    }

    #[test]
    fn distances() {
        let fra = hub(Zone::Eu);
        let ash = hub(Zone::Us);
        let d = distance_km((fra.lat, fra.lon), (ash.lat, ash.lon));
        assert!((6300.0..6700.0).contains(&d), "{d}");
    }
}
