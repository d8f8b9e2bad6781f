//! Fixed-width text tables, the number formats the bench reports use (`-` for a figure that
//! could not be measured), and a figure held against another row's ([`versus`]).

use std::fmt::Write as _;

/// A table printed as aligned text: columns right-aligned unless listed as left-aligned, two
/// spaces between columns, a rule under the header.
pub struct Table {
    widths: Vec<usize>,
    left: Vec<usize>,
    out: String,
}

impl Table {
    /// The first column left-aligned, the others right-aligned.
    pub fn new(header: &[&str], widths: &[usize]) -> Table {
        Table::aligned(header, widths, &[0])
    }

    /// A table whose columns `left` are aligned left.
    pub fn aligned(header: &[&str], widths: &[usize], left: &[usize]) -> Table {
        let mut table = Table {
            widths: widths.to_vec(),
            left: left.to_vec(),
            out: String::new(),
        };
        table.row(header.iter().map(|s| (*s).to_owned()).collect());
        let rule: usize = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        table.out.push_str(&"-".repeat(rule));
        table.out.push('\n');
        table
    }

    pub fn row(&mut self, cells: Vec<String>) {
        for (i, cell) in cells.iter().enumerate() {
            let width = self.widths.get(i).copied().unwrap_or(10);
            let gap = if i == 0 { "" } else { "  " };
            if self.left.contains(&i) {
                let _ = write!(self.out, "{gap}{cell:<width$}");
            } else {
                let _ = write!(self.out, "{gap}{cell:>width$}");
            }
        }
        self.out.push('\n');
    }

    /// The table as text.
    pub fn render(&self) -> &str {
        &self.out
    }

    pub fn print(&self) {
        print!("{}", self.out);
    }
}

/// `value` with `decimals` decimals, `-` for NaN.
pub fn num(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "-".to_owned()
    } else {
        format!("{value:.decimals$}")
    }
}

/// `value` with its sign, `-` for NaN.
pub fn signed(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "-".to_owned()
    } else {
        format!("{value:+.decimals$}")
    }
}

/// `met` or `MISSED`.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// How a figure is held against a base figure (another row's, of the same run).
#[derive(Clone, Copy, Debug)]
pub enum Versus {
    /// `measured / base <= limit`, shown as `1.50x (3.0 / 2.0 us)`.
    Ratio,
    /// `measured - base <= limit`, shown as `+1.0 us (3.0 - 2.0 us)`.
    Difference,
}

/// `measured` against `base`: the text a report shows, and whether it is within `limit`. A
/// missing figure (NaN) is never within it.
pub fn versus(measured: f64, base: f64, (how, limit): (Versus, f64), unit: &str) -> (String, bool) {
    let (measured_text, base_text) = (num(measured, 1), num(base, 1));
    let (figure, text) = match how {
        Versus::Ratio => {
            let ratio = measured / base;
            let text = format!("{}x ({measured_text} / {base_text} {unit})", num(ratio, 2));
            (ratio, text)
        }
        Versus::Difference => {
            let added = measured - base;
            let text = format!(
                "{} {unit} ({measured_text} - {base_text} {unit})",
                signed(added, 1)
            );
            (added, text)
        }
    };
    (text, figure <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned() {
        let mut table = Table::new(&["row", "n"], &[5, 4]);
        table.row(vec!["ab".into(), num(1.5, 1)]);
        assert_eq!(
            table.render(),
            "row       n\n-----------\nab      1.5\n",
            "left then right aligned"
        );
        assert_eq!(num(f64::NAN, 2), "-", "NaN is a dash");
        assert_eq!(signed(0.25, 2), "+0.25", "signed");
    }

    #[test]
    fn figures_against_a_base() {
        assert_eq!(
            versus(3.0, 2.0, (Versus::Ratio, 2.0), "us"),
            ("1.50x (3.0 / 2.0 us)".to_owned(), true),
            "a ratio within its limit"
        );
        assert_eq!(
            versus(9.0, 2.0, (Versus::Ratio, 2.0), "ms"),
            ("4.50x (9.0 / 2.0 ms)".to_owned(), false),
            "a ratio past its limit"
        );
        assert_eq!(
            versus(8.0, 2.0, (Versus::Difference, 5.0), "us"),
            ("+6.0 us (8.0 - 2.0 us)".to_owned(), false),
            "a difference past its limit"
        );
        assert_eq!(
            versus(2.0, 3.0, (Versus::Difference, 5.0), "us"),
            ("-1.0 us (2.0 - 3.0 us)".to_owned(), true),
            "a negative difference is within"
        );
        assert!(
            !versus(3.0, f64::NAN, (Versus::Ratio, 2.0), "us").1,
            "no base figure, no verdict of met"
        );
    }
}
