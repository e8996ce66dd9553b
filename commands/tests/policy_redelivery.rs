//! The policies under at-least-once delivery: a property test that feeds `policy.gamification`
//! and `policy.subscription` a random knowledge history (registrations, questions, answers,
//! comments, votes that replace earlier votes, accepts) shuffled across aggregates (each
//! aggregate's events in order), with duplicates delivered at random places (before the first
//! delivery completes, as when a worker reacts and the read-model guard then reports a gap, or
//! long after, as a redelivery), through two workers with separate state caches (two
//! processes), sometimes concurrently, and with commands that exhaust their conflict retries
//! redelivered later. The profile and subscription aggregates and their stored events must
//! equal a reference fold of the history in order, once: a redelivered message never counts
//! twice.
//!
//! Real SQLite event store in a temporary directory.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use tektree_commands::policies::{Gamification, Metering, Policy};
use tektree_commands::{CommandError, CommandHandler};
use tektree_domain::events::{
    AnswerAccepted, AnswerSubmitted, CommentAdded, ContentVoted, QuestionPosted, UserRegistered,
};
use tektree_domain::{
    level_for_xp, period_of, Actor, Event, EventEnvelope, EventMetadata, GamificationRules,
    NewEvent, Profile, QuotaRules, Subscription, Tier, VoteDirection, XpRules,
};
use tektree_event_store::{EventStore, SqliteStore};
use uuid::Uuid;

const USERS: u8 = 4;
const QUESTIONS: usize = 3;
/// Domain times of the source events: three UTC months, so usage is metered per period.
const TIMES: [&str; 3] = [
    "2024-01-31T23:59:59Z",
    "2024-02-01T00:00:00Z",
    "2024-03-15T12:00:00Z",
];
/// The Free tier's monthly limit in this test (small, so quotas are exceeded).
const FREE_LIMIT: u64 = 2;

/// XP rules with large amounts, so that small histories cross levels both ways.
fn xp_rules() -> XpRules {
    XpRules {
        registration: 1,
        question_posted: 20,
        answer_submitted: 50,
        comment_added: 10,
        upvoted: 60,
        downvoted: -30,
        accepted_answer: 150,
        accepted_question: 20,
        ..XpRules::default()
    }
}

fn quota_rules() -> QuotaRules {
    QuotaRules {
        free: Some(FREE_LIMIT),
        ..QuotaRules::default()
    }
}

fn user(n: u8) -> Uuid {
    Uuid::from_u128(0x1000 + u128::from(n))
}

// ---------------------------------------------------------------------------------------------
// Histories.

#[derive(Debug, Clone)]
enum Op {
    Register {
        user: u8,
    },
    Question {
        q: usize,
        author: Option<u8>,
        tagged: bool,
        when: usize,
    },
    Answer {
        q: usize,
        author: Option<u8>,
        when: usize,
    },
    Comment {
        target: usize,
        author: Option<u8>,
        when: usize,
    },
    Vote {
        target: usize,
        voter: u8,
        up: bool,
    },
    Accept {
        q: usize,
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let author = proptest::option::weighted(0.85, 0..USERS);
    let when = 0..TIMES.len();
    prop_oneof![
        2 => (0..USERS).prop_map(|user| Op::Register { user }),
        2 => (0..QUESTIONS, author.clone(), any::<bool>(), when.clone()).prop_map(
            |(q, author, tagged, when)| Op::Question { q, author, tagged, when }
        ),
        2 => (0..QUESTIONS, author.clone(), when.clone())
            .prop_map(|(q, author, when)| Op::Answer { q, author, when }),
        2 => (0..16usize, author, when)
            .prop_map(|(target, author, when)| Op::Comment { target, author, when }),
        4 => (0..16usize, 0..USERS + 2, any::<bool>())
            .prop_map(|(target, voter, up)| Op::Vote { target, voter, up }),
        1 => (0..QUESTIONS, 0..8usize).prop_map(|(q, pick)| Op::Accept { q, pick }),
    ]
}

/// A committed history: envelopes with per-aggregate sequences and global positions, in
/// position order.
#[derive(Default)]
struct History {
    events: Vec<(EventEnvelope, Event)>,
    sequences: HashMap<(&'static str, Uuid), u64>,
    registered: BTreeSet<Uuid>,
    questions: BTreeMap<usize, (Uuid, Option<Uuid>, Vec<String>)>,
    /// Questions and answers: id, author, tags.
    content: Vec<(Uuid, Option<Uuid>, Vec<String>)>,
    answers: HashMap<Uuid, Vec<(Uuid, Option<Uuid>)>>,
    accepted: BTreeSet<Uuid>,
    votes: HashMap<(Uuid, Uuid), VoteDirection>,
}

impl History {
    fn push(&mut self, aggregate_id: Uuid, event: Event, when: usize) {
        let aggregate_type = event.aggregate_type();
        let seq = self
            .sequences
            .entry((aggregate_type, aggregate_id))
            .or_default();
        *seq += 1;
        let at: DateTime<Utc> = TIMES[when].parse().unwrap();
        let position = self.events.len() as u64 + 1;
        let new = NewEvent {
            event_id: Uuid::from_u128(0xe000_0000 + u128::from(position)),
            aggregate_type: aggregate_type.into(),
            aggregate_id,
            sequence: *seq,
            event: event.clone(),
            metadata: EventMetadata {
                occurred_at: at,
                correlation_id: Uuid::from_u128(0xc000_0000 + u128::from(position)),
                causation_id: Uuid::nil(),
                actor: Actor::System("test".into()),
            },
        };
        self.events.push((new.into_envelope(position, at), event));
    }

    fn build(ops: &[Op]) -> History {
        let mut h = History::default();
        let mut next_id = 0u128;
        let mut new_id = |base: u128| {
            next_id += 1;
            Uuid::from_u128(base + next_id)
        };
        for op in ops {
            match *op {
                Op::Register { user: u } => {
                    let id = user(u);
                    if !h.registered.insert(id) {
                        continue;
                    }
                    let e = UserRegistered {
                        user_id: id,
                        display_name: format!("user{u}"),
                        preferences: Default::default(),
                    };
                    h.push(id, Event::UserRegistered(e), 0);
                }
                Op::Question {
                    q,
                    author,
                    tagged,
                    when,
                } => {
                    if h.questions.contains_key(&q) {
                        continue;
                    }
                    let id = new_id(0x2000);
                    let author = author.map(user);
                    let tags = if tagged { vec!["rome".into()] } else { vec![] };
                    h.questions.insert(q, (id, author, tags.clone()));
                    h.content.push((id, author, tags.clone()));
                    let e = QuestionPosted {
                        question_id: id,
                        author_id: author,
                        title: "t".into(),
                        body: String::new(),
                        tags,
                        area_id: None,
                    };
                    h.push(id, Event::QuestionPosted(e), when);
                }
                Op::Answer { q, author, when } => {
                    let Some((qid, _, tags)) = h.questions.get(&q).cloned() else {
                        continue;
                    };
                    let id = new_id(0x3000);
                    let author = author.map(user);
                    h.answers.entry(qid).or_default().push((id, author));
                    h.content.push((id, author, tags.clone()));
                    let e = AnswerSubmitted {
                        answer_id: id,
                        question_id: qid,
                        author_id: author,
                        body: "a".into(),
                        tags,
                        area_id: None,
                    };
                    h.push(id, Event::AnswerSubmitted(e), when);
                }
                Op::Comment {
                    target,
                    author,
                    when,
                } => {
                    if h.content.is_empty() {
                        continue;
                    }
                    let (id, _, tags) = h.content[target % h.content.len()].clone();
                    let e = CommentAdded {
                        comment_id: new_id(0x4000),
                        content_id: id,
                        author_id: author.map(user),
                        text: "c".into(),
                        tags,
                        area_id: None,
                    };
                    h.push(id, Event::CommentAdded(e), when);
                }
                Op::Vote { target, voter, up } => {
                    if h.content.is_empty() {
                        continue;
                    }
                    let (id, author, tags) = h.content[target % h.content.len()].clone();
                    let voter = user(voter);
                    let direction = if up {
                        VoteDirection::Up
                    } else {
                        VoteDirection::Down
                    };
                    let previous = h.votes.insert((id, voter), direction);
                    if previous == Some(direction) {
                        continue; // the same vote again is a no-op
                    }
                    let v = ContentVoted {
                        content_id: id,
                        voter_id: voter,
                        previous,
                        content_author_id: author,
                        tags,
                        area_id: None,
                        on_answer: false,
                        score: None,
                    };
                    let e = if up {
                        Event::ContentUpvoted(v)
                    } else {
                        Event::ContentDownvoted(v)
                    };
                    h.push(id, e, 1);
                }
                Op::Accept { q, pick } => {
                    let Some((qid, asker, tags)) = h.questions.get(&q).cloned() else {
                        continue;
                    };
                    let Some(answers) = h.answers.get(&qid).filter(|a| !a.is_empty()) else {
                        continue;
                    };
                    if !h.accepted.insert(qid) {
                        continue;
                    }
                    let (aid, answerer) = answers[pick % answers.len()];
                    let e = AnswerAccepted {
                        question_id: qid,
                        answer_id: aid,
                        question_author_id: asker,
                        answer_author_id: answerer,
                        tags,
                        area_id: None,
                    };
                    h.push(qid, Event::AnswerAccepted(e), 2);
                }
            }
        }
        h
    }
}

// ---------------------------------------------------------------------------------------------
// The reference: the history folded once, in position order, from the rules alone.

#[derive(Debug, Default, Clone, PartialEq)]
struct ExpectedProfile {
    xp: i64,
    /// Source event → amount awarded for it.
    awards: BTreeMap<Uuid, i64>,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct ExpectedSubscription {
    opened: bool,
    /// Period → metered source events.
    usage: BTreeMap<String, BTreeSet<Uuid>>,
}

#[derive(Debug, Default)]
struct Reference {
    profiles: BTreeMap<Uuid, ExpectedProfile>,
    subscriptions: BTreeMap<Uuid, ExpectedSubscription>,
}

impl Reference {
    fn fold(history: &History) -> Reference {
        let r = xp_rules();
        let mut out = Reference::default();
        // `recorded`: the award is stored even at 0 XP, because it records an activity (the
        // accepted answer of a self-accept, issue #6).
        let mut award = |user: Option<Uuid>, source: Uuid, amount: i64, recorded: bool| {
            if let (Some(u), true) = (user, amount != 0 || recorded) {
                let p = out.profiles.entry(u).or_default();
                p.xp += amount;
                *p.awards.entry(source).or_default() += amount;
            }
        };
        let value = |d: VoteDirection| match d {
            VoteDirection::Up => r.upvoted,
            VoteDirection::Down => r.downvoted,
        };
        let mut metered: Vec<(Uuid, Uuid, String)> = vec![];
        let mut opened = vec![];
        for (env, event) in &history.events {
            let src = env.event_id;
            let period = period_of(env.occurred_at);
            match event {
                Event::UserRegistered(e) => {
                    award(Some(e.user_id), src, r.registration, false);
                    opened.push(e.user_id);
                }
                Event::QuestionPosted(e) => {
                    award(e.author_id, src, r.question_posted, false);
                    metered.extend(e.author_id.map(|u| (u, src, period)));
                }
                Event::AnswerSubmitted(e) => {
                    award(e.author_id, src, r.answer_submitted, false);
                    metered.extend(e.author_id.map(|u| (u, src, period)));
                }
                Event::CommentAdded(e) => {
                    award(e.author_id, src, r.comment_added, false);
                    metered.extend(e.author_id.map(|u| (u, src, period)));
                }
                Event::ContentUpvoted(e) => {
                    let before = e.previous.map(value).unwrap_or(0);
                    award(e.content_author_id, src, r.upvoted - before, false);
                }
                Event::ContentDownvoted(e) => {
                    let before = e.previous.map(value).unwrap_or(0);
                    award(e.content_author_id, src, r.downvoted - before, false);
                }
                Event::AnswerAccepted(e) => {
                    if e.question_author_id != e.answer_author_id {
                        award(e.answer_author_id, src, r.accepted_answer, false);
                        award(e.question_author_id, src, r.accepted_question, false);
                    } else {
                        award(e.answer_author_id, src, 0, true);
                    }
                }
                other => panic!("not a source event: {other:?}"),
            }
        }
        for u in opened {
            out.subscriptions.entry(u).or_default().opened = true;
        }
        for (u, src, period) in metered {
            out.subscriptions
                .entry(u)
                .or_default()
                .usage
                .entry(period)
                .or_default()
                .insert(src);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery.

/// SplitMix64: a small deterministic generator for delivery plans.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The history's indices in a random order that keeps each aggregate's events in sequence
/// order, with about a third of them delivered once more at a random place.
fn delivery_order(history: &History, rng: &mut Rng) -> Vec<usize> {
    let mut queues: BTreeMap<(String, Uuid), VecDeque<usize>> = BTreeMap::new();
    for (i, (env, _)) in history.events.iter().enumerate() {
        queues
            .entry((env.aggregate_type.clone(), env.aggregate_id))
            .or_default()
            .push_back(i);
    }
    let mut queues: Vec<VecDeque<usize>> = queues.into_values().collect();
    let mut order = vec![];
    while !queues.is_empty() {
        let q = rng.below(queues.len());
        order.extend(queues[q].pop_front());
        if queues[q].is_empty() {
            queues.swap_remove(q);
        }
    }
    for i in 0..history.events.len() {
        if rng.below(3) == 0 {
            let at = rng.below(order.len() + 1);
            order.insert(at, i);
        }
    }
    order
}

/// One worker process: both policies over a handler with its own state cache.
struct Worker {
    policies: [Arc<dyn Policy>; 2],
}

impl Worker {
    fn new(store: &Arc<dyn EventStore>) -> Worker {
        // One attempt only: a command that loses a race to a concurrent delivery fails with
        // `Conflict`, and the delivery is retried later, as a worker does.
        let handler = CommandHandler::new(store.clone()).with_max_attempts(1);
        Worker {
            policies: [
                // No goals: this property is about XP and metering; unlocking under redelivery is
                // `commands/tests/achievements.rs`.
                Arc::new(Gamification::new(
                    handler.clone(),
                    xp_rules(),
                    GamificationRules {
                        achievements: vec![],
                        quests: vec![],
                        streak_milestones: vec![],
                    },
                )),
                Arc::new(Metering::new(handler, quota_rules())),
            ],
        }
    }
}

/// Delivers the history to both policies through `workers` by a random plan of `seed`, up to
/// four deliveries at once: returns the number of reactions that failed and were redelivered.
async fn deliver(history: &History, workers: &[Worker; 2], seed: u64) -> usize {
    let mut rng = Rng(seed);
    // Each policy (consumer group) has its own order; the two run side by side.
    let orders = [
        delivery_order(history, &mut rng),
        delivery_order(history, &mut rng),
    ];
    let mut queue: VecDeque<(usize, usize)> = VecDeque::new();
    let (mut a, mut b) = (0, 0);
    while a < orders[0].len() || b < orders[1].len() {
        let take_a = b == orders[1].len() || (a < orders[0].len() && rng.below(2) == 0);
        if take_a {
            queue.push_back((0, orders[0][a]));
            a += 1;
        } else {
            queue.push_back((1, orders[1][b]));
            b += 1;
        }
    }
    let mut retried = 0;
    let mut rounds = 0;
    while !queue.is_empty() {
        rounds += 1;
        assert!(rounds < 100_000, "delivery does not progress");
        let k = 1 + rng.below(4);
        let mut running = tokio::task::JoinSet::new();
        for delivery in queue.drain(..k.min(queue.len())) {
            let (p, i) = delivery;
            let (env, event) = history.events[i].clone();
            let policy = workers[rng.below(2)].policies[p].clone();
            running.spawn(async move { (delivery, policy.react(&env, &event).await) });
        }
        let mut results = vec![];
        while let Some(done) = running.join_next().await {
            results.push(done.expect("a delivery task panicked"));
        }
        results.sort_by_key(|(d, _)| *d);
        for (delivery, result) in results {
            match result {
                Ok(()) => {}
                Err(CommandError::Conflict { .. }) => {
                    // Not acknowledged: delivered again later.
                    retried += 1;
                    let at = rng.below(queue.len() + 1);
                    queue.insert(at, delivery);
                }
                Err(e) => panic!("policy {} failed: {e}", delivery.0),
            }
        }
    }
    retried
}

// ---------------------------------------------------------------------------------------------
// The property.

async fn redelivery_equals_the_reference(ops: Vec<Op>, seed: u64) {
    let history = History::build(&ops);
    let reference = Reference::fold(&history);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap());
    let workers = [Worker::new(&store), Worker::new(&store)];
    deliver(&history, &workers, seed).await;

    // Everything once more, in order, through a fresh handler: changes nothing.
    let head = store.head().await.unwrap();
    let late = Worker::new(&store);
    for (env, event) in &history.events {
        for p in &late.policies {
            p.react(env, event).await.unwrap();
        }
    }
    assert_eq!(store.head().await.unwrap(), head, "a late redelivery wrote");

    let handler = CommandHandler::new(store.clone());
    let users: Vec<Uuid> = (0..USERS + 2).map(user).collect();
    for u in users {
        check_profile(&handler, u, reference.profiles.get(&u)).await;
        check_subscription(&handler, u, reference.subscriptions.get(&u)).await;
    }
}

/// The profile of `u`: state and stored events equal to the reference.
async fn check_profile(handler: &CommandHandler, u: Uuid, want: Option<&ExpectedProfile>) {
    let want = want.cloned().unwrap_or_default();
    let (state, version) = handler.load::<Profile>(u).await.unwrap();
    assert_eq!(state.xp, want.xp, "xp of {u}");
    assert_eq!(
        state.awarded,
        want.awards.keys().copied().collect::<BTreeSet<_>>(),
        "sources awarded to {u}"
    );
    let stored = handler.store().load("profile", u).await.unwrap();
    assert_eq!(stored.len() as u64, version);
    // Every award once, with the reference amount; totals are the running sum; a level-up
    // follows exactly the awards that raise the level.
    let mut total = 0i64;
    let mut seen = BTreeSet::new();
    let mut events = stored.iter().peekable();
    while let Some(env) = events.next() {
        let Event::XpEarned(e) = env.decode().unwrap() else {
            panic!(
                "{u}: a profile event other than xp.earned first: {}",
                env.event_type
            );
        };
        assert!(seen.insert(e.source_event_id), "{u}: source awarded twice");
        assert_eq!(Some(&e.amount), want.awards.get(&e.source_event_id), "{u}");
        assert_eq!(env.causation_id, e.source_event_id, "{u}: causation");
        let before = total;
        total += e.amount;
        assert_eq!(e.total_xp, total, "{u}: running total");
        let level_up =
            events
                .peek()
                .map(|next| next.decode().unwrap())
                .and_then(|next| match next {
                    Event::LevelUp(l) => Some(l),
                    _ => None,
                });
        if level_for_xp(total) > level_for_xp(before) {
            let l = level_up.unwrap_or_else(|| panic!("{u}: no level-up at {total} XP"));
            assert_eq!(
                (l.from_level, l.to_level, l.total_xp),
                (level_for_xp(before), level_for_xp(total), total)
            );
            let next = events.next().unwrap();
            assert_eq!(next.causation_id, e.source_event_id);
        } else {
            assert!(level_up.is_none(), "{u}: level-up without a new level");
        }
    }
    assert_eq!(total, want.xp, "{u}");
}

/// The subscription of `u`: state and stored events equal to the reference.
async fn check_subscription(
    handler: &CommandHandler,
    u: Uuid,
    want: Option<&ExpectedSubscription>,
) {
    let want = want.cloned().unwrap_or_default();
    let (state, _) = handler.load::<Subscription>(u).await.unwrap();
    assert_eq!(state.tier, want.opened.then_some(Tier::Free), "tier of {u}");
    let used: BTreeMap<String, u64> = want
        .usage
        .iter()
        .map(|(p, s)| (p.clone(), s.len() as u64))
        .collect();
    assert_eq!(state.used, used, "usage of {u}");
    let metered: BTreeSet<Uuid> = want.usage.values().flatten().copied().collect();
    assert_eq!(state.metered, metered, "metered sources of {u}");
    let exceeded: BTreeSet<String> = used
        .iter()
        .filter(|(_, n)| **n > FREE_LIMIT)
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(state.exceeded, exceeded, "exceeded periods of {u}");

    // Stored events: one creation when registered; per period, usage counted 1, 2, … once per
    // source, and one quota.exceeded right after the usage that passes the limit.
    let stored = handler.store().load("subscription", u).await.unwrap();
    let mut created = 0;
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    let mut sources = BTreeSet::new();
    let mut last_usage: Option<(String, u64)> = None;
    let mut exceeded_seen = BTreeSet::new();
    for env in &stored {
        match env.decode().unwrap() {
            Event::SubscriptionCreated(e) => {
                created += 1;
                assert_eq!(e.tier, Tier::Free);
            }
            Event::UsageRecorded(e) => {
                let n = counted.entry(e.period.clone()).or_default();
                *n += 1;
                assert_eq!(e.used, *n, "{u}: usage count in {}", e.period);
                assert_eq!(e.limit, Some(FREE_LIMIT));
                assert!(sources.insert(e.source_event_id), "{u}: metered twice");
                assert!(
                    want.usage[&e.period].contains(&e.source_event_id),
                    "{u}: metered in the wrong period"
                );
                assert_eq!(env.causation_id, e.source_event_id);
                last_usage = Some((e.period, e.used));
                continue;
            }
            Event::QuotaExceeded(e) => {
                assert_eq!(
                    last_usage.as_ref(),
                    Some(&(e.period.clone(), FREE_LIMIT + 1)),
                    "{u}: quota.exceeded not right after the usage passing the limit"
                );
                assert!(exceeded_seen.insert(e.period), "{u}: exceeded twice");
            }
            other => panic!("{u}: unexpected subscription event {other:?}"),
        }
        last_usage = None;
    }
    assert_eq!(
        created,
        usize::from(want.opened),
        "{u}: subscriptions created"
    );
    assert_eq!(counted, used, "{u}");
    assert_eq!(exceeded_seen, exceeded, "{u}");
}

proptest! {
    // Each case commits up to ~100 events to a durable SQLite file: keep the size small.
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn redelivered_shuffled_and_duplicated_sources_count_once(
        ops in proptest::collection::vec(op(), 0..48),
        seed in any::<u64>(),
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(redelivery_equals_the_reference(ops, seed));
    }
}

#[tokio::test]
async fn a_fixed_history_with_every_kind_of_source_counts_once() {
    // A deterministic case that certainly exercises every branch: level-ups, vote replacement,
    // accepts, comments by unregistered authors and a quota passed in one period.
    let ops = vec![
        Op::Register { user: 0 },
        Op::Register { user: 1 },
        Op::Question {
            q: 0,
            author: Some(0),
            tagged: true,
            when: 0,
        },
        Op::Answer {
            q: 0,
            author: Some(1),
            when: 0,
        },
        Op::Answer {
            q: 0,
            author: Some(2),
            when: 1,
        },
        Op::Comment {
            target: 0,
            author: Some(0),
            when: 0,
        },
        Op::Comment {
            target: 1,
            author: Some(3),
            when: 2,
        },
        Op::Vote {
            target: 1,
            voter: 0,
            up: true,
        },
        Op::Vote {
            target: 1,
            voter: 0,
            up: false,
        },
        Op::Vote {
            target: 1,
            voter: 5,
            up: true,
        },
        Op::Accept { q: 0, pick: 0 },
        Op::Comment {
            target: 0,
            author: Some(0),
            when: 0,
        },
    ];
    let history = History::build(&ops);
    assert_eq!(history.events.len(), ops.len());
    let reference = Reference::fold(&history);
    // User 0 metered 3 posts in January (limit 2); user 1 passes level 2.
    let january = &reference.subscriptions[&user(0)].usage["2024-01"];
    assert_eq!(january.len(), 3);
    assert!(level_for_xp(reference.profiles[&user(1)].xp) >= 2);
    for seed in 0..4 {
        redelivery_equals_the_reference(ops.clone(), seed).await;
    }
}
