//! Pool sizer: pool sizes per weekday and time of day, e.g. more idle runners during
//! lectures.
//!
//! Configuration:
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `slots` | none | `;`- or newline-separated slots `DAYS HH:MM-HH:MM = N` |
//! | `default` | the configured pool size | size outside every slot |
//! | `timeZone` | none | IANA time zone of the slots, e.g. `Europe/Berlin`; daylight saving time is applied (rules bundled into the plugin) |
//! | `utcOffsetMinutes` | `0` | a fixed offset instead (local = UTC + offset), used only without `timeZone` |
//!
//! `DAYS` is a comma-separated list of days (`mon` … `sun`) or day ranges (`mon-fri`),
//! or `daily`. Times are local; the end is exclusive, and a slot whose end is not after
//! its start runs over midnight (`fri 22:00-02:00` covers Friday night into Saturday).
//! When several slots cover the same moment the largest size wins.
//!
//! ```yaml
//! config:
//!   timeZone: Europe/Berlin
//!   default: "2"
//!   slots: "mon-fri 08:00-10:00 = 20; tue,thu 14:15-15:45 = 35"
//! ```

use poseidon_plugin_api::{config, export_pool_sizer, warn, Environment, PoolSizer, PoolState};

/// One configured time slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Days (0 = Monday … 6 = Sunday) on which the slot starts.
    pub days: [bool; 7],
    /// Start, minutes after local midnight.
    pub start: u32,
    /// End (exclusive), minutes after local midnight; `<= start` means the next day.
    pub end: u32,
    /// Pool size during the slot.
    pub size: u32,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_DAY: u32 = 24 * 60;

fn parse_day(s: &str) -> Result<usize, String> {
    let lower = s.trim().to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| lower.starts_with(d))
        .ok_or_else(|| format!("unknown day {s:?}"))
}

fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.eq_ignore_ascii_case("daily") || part == "*" {
            days = [true; 7];
        } else if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (parse_day(a)?, parse_day(b)?);
            let mut d = a;
            loop {
                days[d] = true;
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
        } else {
            days[parse_day(part)?] = true;
        }
    }
    if days.iter().any(|d| *d) {
        Ok(days)
    } else {
        Err(format!("no days in {s:?}"))
    }
}

fn parse_time(s: &str) -> Result<u32, String> {
    let (h, m) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("time {s:?} is not HH:MM"))?;
    let h: u32 = h.parse().map_err(|_| format!("bad hour in {s:?}"))?;
    let m: u32 = m.parse().map_err(|_| format!("bad minute in {s:?}"))?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(format!("time {s:?} out of range"));
    }
    Ok(h * 60 + m)
}

/// Parses one slot, `DAYS HH:MM-HH:MM = N`.
pub fn parse_slot(s: &str) -> Result<Slot, String> {
    let (when, size) = s
        .split_once('=')
        .ok_or_else(|| format!("slot {s:?} has no '= size'"))?;
    let size: u32 = size
        .trim()
        .parse()
        .map_err(|_| format!("bad size in slot {s:?}"))?;
    let when = when.trim();
    let (days, times) = when
        .rsplit_once(char::is_whitespace)
        .ok_or_else(|| format!("slot {s:?} needs days and a time range"))?;
    let (start, end) = times
        .split_once('-')
        .ok_or_else(|| format!("bad time range in slot {s:?}"))?;
    Ok(Slot {
        days: parse_days(days)?,
        start: parse_time(start)?,
        end: parse_time(end)?,
        size,
    })
}

/// Parses the `slots` value; returns the slots that parsed and the errors of the others.
pub fn parse_slots(s: &str) -> (Vec<Slot>, Vec<String>) {
    let mut slots = Vec::new();
    let mut errors = Vec::new();
    for part in s
        .split([';', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match parse_slot(part) {
            Ok(slot) => slots.push(slot),
            Err(e) => errors.push(e),
        }
    }
    (slots, errors)
}

/// Local weekday (0 = Monday) and minute of the day for a Unix time and a fixed UTC
/// offset.
pub fn local_time(unix_seconds: i64, utc_offset_minutes: i64) -> (usize, u32) {
    let local_minutes = unix_seconds.div_euclid(60) + utc_offset_minutes;
    let days = local_minutes.div_euclid(i64::from(MINUTES_PER_DAY));
    let minute = local_minutes.rem_euclid(i64::from(MINUTES_PER_DAY)) as u32;
    // 1970-01-01 was a Thursday (index 3).
    let weekday = (days + 3).rem_euclid(7) as usize;
    (weekday, minute)
}

/// Local weekday (0 = Monday) and minute of the day for a Unix time in an IANA time
/// zone, daylight saving time included (jiff with its bundled copy of the tz database,
/// so the plugin needs no file from the host).
pub fn zoned_local_time(unix_seconds: i64, zone: &str) -> Result<(usize, u32), String> {
    let tz = jiff::tz::TimeZone::get(zone).map_err(|e| format!("time zone {zone:?}: {e}"))?;
    let at = jiff::Timestamp::from_second(unix_seconds)
        .map_err(|e| format!("time {unix_seconds}: {e}"))?
        .to_zoned(tz);
    let weekday = at.weekday().to_monday_zero_offset() as usize;
    let minute = at.hour() as u32 * 60 + at.minute() as u32;
    Ok((weekday, minute))
}

/// The local time the slots are read in: `timeZone` if configured (an unknown zone is
/// logged and falls back to UTC), else `utcOffsetMinutes`.
fn configured_local_time(now: i64) -> (usize, u32) {
    if let Some(zone) = config::get("timeZone") {
        match zoned_local_time(now, zone.trim()) {
            Ok(local) => return local,
            Err(e) => warn!("{e}; using UTC"),
        }
        return local_time(now, 0);
    }
    local_time(now, config::parse("utcOffsetMinutes").unwrap_or(0))
}

impl Slot {
    /// Whether the slot covers local `weekday`/`minute`.
    pub fn covers(&self, weekday: usize, minute: u32) -> bool {
        if self.end > self.start {
            self.days[weekday] && (self.start..self.end).contains(&minute)
        } else {
            // Over midnight: the part before midnight belongs to a slot day, the part
            // after midnight to the day after one.
            let yesterday = (weekday + 6) % 7;
            (self.days[weekday] && minute >= self.start)
                || (self.days[yesterday] && minute < self.end)
        }
    }
}

/// The pool size for a moment: the largest covering slot, or `default`.
pub fn size_at(slots: &[Slot], default: u32, weekday: usize, minute: u32) -> u32 {
    slots
        .iter()
        .filter(|s| s.covers(weekday, minute))
        .map(|s| s.size)
        .max()
        .unwrap_or(default)
}

/// The exported plugin.
pub struct TimetableSizer;

impl PoolSizer for TimetableSizer {
    fn wanted_idle(_environment: Environment, state: PoolState) -> u32 {
        let (slots, errors) = parse_slots(&config::get("slots").unwrap_or_default());
        for e in errors {
            warn!("ignoring slot: {e}");
        }
        let default = config::parse("default").unwrap_or(state.configured_size);
        let (weekday, minute) = configured_local_time(state.now);
        size_at(&slots, default, weekday, minute)
    }
}

export_pool_sizer!(TimetableSizer);

#[cfg(test)]
mod tests {
    use super::*;
    use poseidon_plugin_api::testing::set_config;

    #[test]
    fn weekday_of_known_dates() {
        // 1970-01-01 00:00 UTC: Thursday.
        assert_eq!(local_time(0, 0), (3, 0));
        // 2024-01-01 09:30 UTC was a Monday.
        assert_eq!(local_time(1_704_101_400, 0), (0, 9 * 60 + 30));
        // One hour east of UTC it is 10:30.
        assert_eq!(local_time(1_704_101_400, 60), (0, 10 * 60 + 30));
        // Before the epoch: 1969-12-31 23:59 was a Wednesday.
        assert_eq!(local_time(-60, 0), (2, 23 * 60 + 59));
    }

    /// The bug of the fixed offset: a Berlin lecture plan is an hour off from the last
    /// Sunday of March to the last Sunday of October.
    #[test]
    fn berlin_follows_daylight_saving_time() {
        // 2024-01-08 (Monday) 08:30 UTC = 09:30 CET.
        assert_eq!(
            zoned_local_time(1_704_702_600, "Europe/Berlin"),
            Ok((0, 9 * 60 + 30))
        );
        // 2024-07-08 (Monday) 08:30 UTC = 10:30 CEST.
        assert_eq!(
            zoned_local_time(1_720_427_400, "Europe/Berlin"),
            Ok((0, 10 * 60 + 30))
        );
        // The switch: 2024-03-31 00:59:59 UTC is 01:59:59 CET, one second later 03:00 CEST.
        assert_eq!(
            zoned_local_time(1_711_846_799, "Europe/Berlin"),
            Ok((6, 119))
        );
        assert_eq!(
            zoned_local_time(1_711_846_800, "Europe/Berlin"),
            Ok((6, 180))
        );
        let e = zoned_local_time(0, "Mars/Olympus").unwrap_err();
        assert!(e.contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn summer_lecture_uses_the_summer_offset() {
        set_config([
            ("slots", "mon 10:00-12:00 = 12"),
            ("timeZone", "Europe/Berlin"),
        ]);
        let env = Environment {
            id: 1,
            image: "i".into(),
            prewarming_pool_size: 4,
            cpu_limit: 1,
            memory_limit: 1,
            network_access: false,
            exposed_ports: vec![],
        };
        let mut state = PoolState {
            configured_size: 4,
            idle: 0,
            used: 0,
            starting: 0,
            claims_per_minute: vec![0; 60],
            empty_pool_misses: 0,
            // Monday 2024-07-08 08:30 UTC = 10:30 in Berlin (CEST): in the slot.
            now: 1_720_427_400,
        };
        assert_eq!(TimetableSizer::wanted_idle(env.clone(), state.clone()), 12);
        // The same UTC time in January is 09:30 in Berlin: before the slot.
        state.now = 1_704_702_600;
        assert_eq!(TimetableSizer::wanted_idle(env, state), 4);
    }

    #[test]
    fn parses_slots_and_reports_bad_ones() {
        let (slots, errors) = parse_slots(
            "mon-fri 08:00-10:00 = 20; tue,thu 14:15-15:45=35\nbogus; sat 25:00-26:00 = 1",
        );
        assert_eq!(slots.len(), 2);
        assert_eq!(errors.len(), 2);
        assert_eq!(slots[0].days, [true, true, true, true, true, false, false]);
        assert_eq!(
            slots[1].days,
            [false, true, false, true, false, false, false]
        );
        assert_eq!(
            (slots[1].start, slots[1].end, slots[1].size),
            (855, 945, 35)
        );
    }

    #[test]
    fn day_ranges_wrap_around_the_week() {
        assert_eq!(
            parse_days("fri-mon").unwrap(),
            [true, false, false, false, true, true, true]
        );
        assert_eq!(parse_days("daily").unwrap(), [true; 7]);
    }

    #[test]
    fn largest_covering_slot_wins_and_end_is_exclusive() {
        let (slots, _) = parse_slots("mon-fri 08:00-10:00 = 20; mon 09:00-09:30 = 30");
        assert_eq!(size_at(&slots, 2, 0, 8 * 60), 20);
        assert_eq!(size_at(&slots, 2, 0, 9 * 60 + 10), 30);
        assert_eq!(size_at(&slots, 2, 0, 10 * 60), 2);
        assert_eq!(size_at(&slots, 2, 5, 9 * 60), 2);
    }

    #[test]
    fn slots_over_midnight() {
        let (slots, _) = parse_slots("fri 22:00-02:00 = 9");
        assert_eq!(size_at(&slots, 1, 4, 23 * 60), 9);
        assert_eq!(size_at(&slots, 1, 5, 60), 9);
        assert_eq!(size_at(&slots, 1, 5, 3 * 60), 1);
        assert_eq!(size_at(&slots, 1, 3, 60), 1);
    }

    #[test]
    fn plugin_uses_configuration() {
        set_config([
            ("slots", "mon 09:00-11:00 = 12"),
            ("utcOffsetMinutes", "60"),
        ]);
        let env = Environment {
            id: 1,
            image: "i".into(),
            prewarming_pool_size: 4,
            cpu_limit: 1,
            memory_limit: 1,
            network_access: false,
            exposed_ports: vec![],
        };
        let mut state = PoolState {
            configured_size: 4,
            idle: 0,
            used: 0,
            starting: 0,
            claims_per_minute: vec![0; 60],
            empty_pool_misses: 0,
            // Monday 2024-01-01 09:30 UTC = 10:30 local.
            now: 1_704_101_400,
        };
        assert_eq!(TimetableSizer::wanted_idle(env.clone(), state.clone()), 12);
        state.now += 3600;
        assert_eq!(TimetableSizer::wanted_idle(env, state), 4);
    }
}
