//! The log cap's fair share (docs/logs.md, "Retention"): which org's lines go when the
//! server holds more than the cap. Both stores count each org's lines (`log_counts`) and ask
//! [`cuts`] how many of each org's oldest lines to delete.

/// How many lines to delete from each org (its oldest first) so that `counts` (lines held per
/// org) total at most `max`: the orgs holding the most are cut down to one level, as few
/// lines as needed and no more. An org holding no more than `max` / (orgs holding lines) so
/// never loses a line to the cap, whatever the others hold. Empty when under the cap or for
/// `max` 0 (no cap). Orgs with a cut are listed by name.
pub fn cuts(counts: &[(String, i64)], max: u64) -> Vec<(String, i64)> {
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let total: i64 = counts.iter().map(|(_, n)| (*n).max(0)).sum();
    if max == 0 || total <= max {
        return Vec::new();
    }
    let excess = total - max;
    let mut sorted: Vec<(&str, i64)> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(o, n)| (o.as_str(), *n))
        .collect();
    // Most lines first; equal counts by name, so the result does not depend on input order.
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    // The top `j` orgs come down to one level `level`, found as the first `j` for which
    // bringing them down to the next org's count would free at least `excess`.
    let mut top_sum = 0i64;
    let mut j = 0;
    while j < sorted.len() {
        top_sum += sorted[j].1;
        j += 1;
        let next = sorted.get(j).map_or(0, |(_, n)| *n);
        if top_sum - next * j as i64 >= excess {
            break;
        }
    }
    let n = j as i64;
    let kept = top_sum - excess; // lines the top `j` keep together, spread evenly
    let (level, extra) = (kept / n, kept % n);
    let mut out: Vec<(String, i64)> = sorted[..j]
        .iter()
        .enumerate()
        .map(|(i, (org, held))| {
            let keep = level + i64::from((i as i64) < extra);
            (org.to_string(), held - keep)
        })
        .filter(|(_, cut)| *cut > 0)
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::cuts;

    fn c(v: &[(&str, i64)]) -> Vec<(String, i64)> {
        v.iter().map(|(o, n)| (o.to_string(), *n)).collect()
    }

    #[test]
    fn under_the_cap_or_no_cap_nothing_goes() {
        assert!(cuts(&c(&[("a", 5), ("b", 5)]), 10).is_empty());
        assert!(cuts(&c(&[("a", 5), ("b", 500)]), 0).is_empty());
        assert!(cuts(&[], 10).is_empty());
    }

    #[test]
    fn the_largest_org_pays_alone_while_it_stays_the_largest() {
        assert_eq!(
            cuts(&c(&[("small", 3), ("big", 100), ("mid", 20)]), 100),
            c(&[("big", 23)])
        );
    }

    #[test]
    fn orgs_over_their_share_come_down_to_one_level() {
        // 90 + 60 + 10 = 160 over 100: a and b down to 45 together (90 lines), c keeps 10.
        assert_eq!(
            cuts(&c(&[("a", 90), ("b", 60), ("c", 10)]), 100),
            c(&[("a", 45), ("b", 15)])
        );
        // Exactly the excess, an odd one: 51 + 50 over 100 by one line.
        let got = cuts(&c(&[("a", 50), ("b", 51)]), 100);
        assert_eq!(got, c(&[("b", 1)]));
        // Equal orgs share a cut that does not divide evenly.
        let got = cuts(&c(&[("a", 10), ("b", 10), ("c", 10)]), 10);
        assert_eq!(got.iter().map(|(_, n)| n).sum::<i64>(), 20);
        assert!(got.iter().all(|(_, n)| (6..=7).contains(n)), "{got:?}");
    }

    #[test]
    fn an_org_within_its_share_never_loses_a_line() {
        // Whatever the others hold, an org with at most max / orgs keeps all of its lines.
        for big in [11, 50, 1_000, 1_000_000] {
            for small in 0..=5 {
                let got = cuts(&c(&[("small", small), ("big", big), ("other", 5)]), 15);
                assert!(
                    got.iter().all(|(o, _)| o != "small"),
                    "{big} {small}: {got:?}"
                );
                let left = small + big + 5 - got.iter().map(|(_, n)| n).sum::<i64>();
                assert_eq!(left, 15.min(small + big + 5));
            }
        }
    }
}
