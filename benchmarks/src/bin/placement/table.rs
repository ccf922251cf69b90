//! The side-by-side markdown table: one row per metric, one column per planner,
//! and their ratio, like `control_plane/run.sh` prints.

/// One metric: each column's value (none where it does not apply) and how many
/// decimals to print.
#[derive(Debug)]
struct Row {
    metric: String,
    left: Option<f64>,
    right: Option<f64>,
    decimals: usize,
}

/// A table comparing two planners.
#[derive(Debug)]
pub struct Table {
    left: String,
    right: String,
    rows: Vec<Row>,
}

impl Table {
    /// An empty table with these two column names.
    pub fn new(left: &str, right: &str) -> Self {
        Self {
            left: left.to_owned(),
            right: right.to_owned(),
            rows: Vec::new(),
        }
    }

    /// Adds a metric.
    pub fn row(
        &mut self,
        metric: &str,
        left: Option<f64>,
        right: Option<f64>,
        decimals: usize,
    ) -> &mut Self {
        self.rows.push(Row {
            metric: metric.to_owned(),
            left,
            right,
            decimals,
        });
        self
    }

    /// The table in markdown.
    pub fn render(&self) -> String {
        let cell = |v: Option<f64>, decimals: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
        };
        let mut out = format!(
            "| metric | {} | {} | {}/{} |\n|:--|--:|--:|--:|\n",
            self.left, self.right, self.left, self.right
        );
        for row in &self.rows {
            let ratio = match (row.left, row.right) {
                (Some(l), Some(r)) if r != 0.0 => Some(l / r),
                _ => None,
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                row.metric,
                cell(row.left, row.decimals),
                cell(row.right, row.decimals),
                cell(ratio, 2)
            ));
        }
        out
    }
}
