//! The import report: per command kind, how many commands were accepted (wrote events), were
//! unchanged (idempotent no-ops), were rejected (by reason code) and how many rows were skipped.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// The kinds of rows the importer counts; one command kind per imported row type, plus the
/// post and vote types it skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Users.xml row → `UserCommand::Register`.
    RegisterUser,
    /// Posts.xml `PostTypeId` 1 → `ContentCommand::PostQuestion`.
    PostQuestion,
    /// Posts.xml `PostTypeId` 2 → `ContentCommand::SubmitAnswer`.
    SubmitAnswer,
    /// Comments.xml row → `ContentCommand::AddComment`.
    AddComment,
    /// Votes.xml `VoteTypeId` 2 → `ContentCommand::Vote` up.
    Upvote,
    /// Votes.xml `VoteTypeId` 3 → `ContentCommand::Vote` down.
    Downvote,
    /// Votes.xml `VoteTypeId` 1 → `ContentCommand::AcceptAnswer`.
    AcceptAnswer,
    /// Posts.xml rows of other post types (tag wikis, …): always skipped.
    OtherPost,
    /// Votes.xml rows of other vote types (close, deletion, …): always skipped.
    OtherVote,
}

impl CommandKind {
    /// Every kind, in report order.
    pub const ALL: [CommandKind; 9] = [
        CommandKind::RegisterUser,
        CommandKind::PostQuestion,
        CommandKind::SubmitAnswer,
        CommandKind::AddComment,
        CommandKind::Upvote,
        CommandKind::Downvote,
        CommandKind::AcceptAnswer,
        CommandKind::OtherPost,
        CommandKind::OtherVote,
    ];

    /// The snake_case name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::RegisterUser => "register_user",
            CommandKind::PostQuestion => "post_question",
            CommandKind::SubmitAnswer => "submit_answer",
            CommandKind::AddComment => "add_comment",
            CommandKind::Upvote => "upvote",
            CommandKind::Downvote => "downvote",
            CommandKind::AcceptAnswer => "accept_answer",
            CommandKind::OtherPost => "other_post",
            CommandKind::OtherVote => "other_vote",
        }
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts of one [`CommandKind`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindReport {
    /// The kind.
    pub kind: CommandKind,
    /// Commands that wrote events.
    pub accepted: u64,
    /// Commands that succeeded without writing anything (already imported).
    pub unchanged: u64,
    /// Rejected rows by reason code ([`tektree_commands::CommandError::code`], e.g.
    /// `not_found.content`, or `not_found.answer` for accepts decided without a command).
    pub rejected: BTreeMap<String, u64>,
    /// Skipped rows by reason (`post_type.N`, `vote_type.N`, `target_skipped`).
    pub skipped: BTreeMap<String, u64>,
    /// Events written by the accepted commands.
    pub events: u64,
}

impl KindReport {
    fn new(kind: CommandKind) -> Self {
        KindReport {
            kind,
            accepted: 0,
            unchanged: 0,
            rejected: BTreeMap::new(),
            skipped: BTreeMap::new(),
            events: 0,
        }
    }

    /// Rejected rows, all reasons.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Skipped rows, all reasons.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    /// Rows counted: accepted + unchanged + rejected + skipped.
    pub fn rows(&self) -> u64 {
        self.accepted + self.unchanged + self.rejected_total() + self.skipped_total()
    }
}

/// The result of one import: counts per [`CommandKind`] (every kind is present, in
/// [`CommandKind::ALL`] order). `Display` renders a table; `Serialize` gives JSON like
/// `{"site": "…", "elapsed_ms": 1234, "kinds": [{"kind": "register_user", "accepted": 3839,
/// "unchanged": 0, "rejected": {}, "skipped": {}, "events": 3839}, …]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// The site name used in the ids.
    pub site: String,
    /// Wall-clock time of the import (commands only, not waiting for the pipeline).
    pub elapsed_ms: u64,
    /// Counts per kind.
    pub kinds: Vec<KindReport>,
}

impl ImportReport {
    /// An empty report for `site`.
    pub fn new(site: impl Into<String>) -> Self {
        ImportReport {
            site: site.into(),
            elapsed_ms: 0,
            kinds: CommandKind::ALL
                .iter()
                .map(|k| KindReport::new(*k))
                .collect(),
        }
    }

    /// The counts of `kind`.
    pub fn kind(&self, kind: CommandKind) -> &KindReport {
        self.kinds
            .iter()
            .find(|k| k.kind == kind)
            .expect("every kind is present")
    }

    fn kind_mut(&mut self, kind: CommandKind) -> &mut KindReport {
        self.kinds
            .iter_mut()
            .find(|k| k.kind == kind)
            .expect("every kind is present")
    }

    /// Counts a command that wrote `events` events (accepted) or none (unchanged).
    pub fn record_ok(&mut self, kind: CommandKind, events: u64) {
        let k = self.kind_mut(kind);
        if events == 0 {
            k.unchanged += 1;
        } else {
            k.accepted += 1;
            k.events += events;
        }
    }

    /// Counts a rejected row.
    pub fn record_rejected(&mut self, kind: CommandKind, reason: &str) {
        *self
            .kind_mut(kind)
            .rejected
            .entry(reason.into())
            .or_default() += 1;
    }

    /// Counts a skipped row.
    pub fn record_skipped(&mut self, kind: CommandKind, reason: &str) {
        *self
            .kind_mut(kind)
            .skipped
            .entry(reason.into())
            .or_default() += 1;
    }

    /// Accepted commands, all kinds.
    pub fn accepted(&self) -> u64 {
        self.kinds.iter().map(|k| k.accepted).sum()
    }

    /// Unchanged commands, all kinds.
    pub fn unchanged(&self) -> u64 {
        self.kinds.iter().map(|k| k.unchanged).sum()
    }

    /// Rejected rows, all kinds.
    pub fn rejected(&self) -> u64 {
        self.kinds.iter().map(KindReport::rejected_total).sum()
    }

    /// Skipped rows, all kinds.
    pub fn skipped(&self) -> u64 {
        self.kinds.iter().map(KindReport::skipped_total).sum()
    }

    /// Events written, all kinds.
    pub fn events(&self) -> u64 {
        self.kinds.iter().map(|k| k.events).sum()
    }

    /// Rows counted, all kinds.
    pub fn rows(&self) -> u64 {
        self.kinds.iter().map(KindReport::rows).sum()
    }

    /// Rejected rows by reason code, all kinds.
    pub fn rejected_by_reason(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for k in &self.kinds {
            for (r, n) in &k.rejected {
                *m.entry(r.clone()).or_default() += n;
            }
        }
        m
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Stack Exchange import of site {:?}: {} rows in {:.1} s, {} events written",
            self.site,
            self.rows(),
            self.elapsed_ms as f64 / 1000.0,
            self.events()
        )?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, a, u, r, s, e| {
            writeln!(f, "  {name:<14} {a:>9} {u:>9} {r:>9} {s:>9} {e:>9}")
        };
        writeln!(
            f,
            "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "kind", "accepted", "unchanged", "rejected", "skipped", "events"
        )?;
        for k in &self.kinds {
            line(
                f,
                k.kind.as_str(),
                k.accepted,
                k.unchanged,
                k.rejected_total(),
                k.skipped_total(),
                k.events,
            )?;
        }
        line(
            f,
            "total",
            self.accepted(),
            self.unchanged(),
            self.rejected(),
            self.skipped(),
            self.events(),
        )?;
        fn rejected(k: &KindReport) -> &BTreeMap<String, u64> {
            &k.rejected
        }
        fn skipped(k: &KindReport) -> &BTreeMap<String, u64> {
            &k.skipped
        }
        type Pick = fn(&KindReport) -> &BTreeMap<String, u64>;
        for (title, pick) in [("rejected", rejected as Pick), ("skipped", skipped as Pick)] {
            let rows: Vec<(CommandKind, &String, &u64)> = self
                .kinds
                .iter()
                .flat_map(|k| pick(k).iter().map(move |(r, n)| (k.kind, r, n)))
                .collect();
            if rows.is_empty() {
                continue;
            }
            writeln!(f, "{title}:")?;
            for (kind, reason, n) in rows {
                writeln!(f, "  {:<14} {reason:<20} {n:>9}", kind.as_str())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_and_serialize() {
        let mut r = ImportReport::new("history.meta");
        r.record_ok(CommandKind::RegisterUser, 1);
        r.record_ok(CommandKind::RegisterUser, 0);
        r.record_rejected(CommandKind::Upvote, "not_found.content");
        r.record_skipped(CommandKind::OtherVote, "vote_type.10");
        assert_eq!(
            (r.accepted(), r.unchanged(), r.rejected(), r.skipped()),
            (1, 1, 1, 1)
        );
        assert_eq!(r.rows(), 4);
        let text = r.to_string();
        assert!(text.contains("register_user"), "{text}");
        assert!(text.contains("not_found.content"), "{text}");
        assert!(text.contains("vote_type.10"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kinds"][0]["kind"], "register_user");
        assert_eq!(json["kinds"][4]["rejected"]["not_found.content"], 1);
    }
}
