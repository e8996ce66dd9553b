//! Achievements, quests and streak milestones under at-least-once delivery (issue #6): a
//! user's history — twelve answers on ten consecutive UTC days across two ISO weeks, ten
//! upvotes and a downvote on one answer, an accepted answer — is delivered to the gamification
//! policy twice over, shuffled (each aggregate's events in order), through two workers with
//! separate state caches that race on the profile; then the unlock events themselves are
//! delivered twice (their XP rewards). Every goal must be reached exactly once and every
//! reward awarded once. Expected goals are worked out by hand from the history below.
//!
//! Real SQLite event store in a temporary directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use tektree_commands::policies::{Gamification, Policy};
use tektree_commands::{CommandError, CommandHandler};
use tektree_domain::events::{AnswerAccepted, AnswerSubmitted, ContentVoted};
use tektree_domain::{
    Actor, Event, EventEnvelope, EventMetadata, GamificationRules, NewEvent, XpRules,
};
use tektree_event_store::{EventStore, SqliteStore};
use uuid::Uuid;

/// One source event of the history, as the bus would deliver it.
fn envelope(aggregate: (&str, Uuid, u64), event: Event, at: &str, position: u64) -> EventEnvelope {
    NewEvent {
        event_id: Uuid::new_v4(),
        aggregate_type: aggregate.0.into(),
        aggregate_id: aggregate.1,
        sequence: aggregate.2,
        event,
        metadata: EventMetadata {
            occurred_at: at.parse().unwrap(),
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            actor: Actor::importer(),
        },
    }
    .into_envelope(position, Utc::now())
}

/// The history of user `u` (see the module docs), in store order.
fn history(u: Uuid) -> Vec<EventEnvelope> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut push = |agg: (&str, Uuid, u64), e: Event, at: String| {
        pos += 1;
        out.push(envelope(agg, e, &at, pos));
    };
    // One answer a day from Mon 2024-03-04 (ISO week 10) to Mon 2024-03-11 (week 11), then two
    // on each of 03-12 and 03-13: 12 answers, 10 consecutive active days, 7 in week 10 and 5 in
    // week 11.
    let mut days: Vec<String> = (4..=11).map(|d| format!("2024-03-{d:02}")).collect();
    days.extend(["2024-03-12", "2024-03-12", "2024-03-13", "2024-03-13"].map(String::from));
    let question = Uuid::new_v4();
    let mut answers = Vec::new();
    for day in &days {
        let a = Uuid::new_v4();
        answers.push(a);
        let e = Event::AnswerSubmitted(AnswerSubmitted {
            answer_id: a,
            question_id: question,
            author_id: Some(u),
            body: "b".into(),
            tags: vec![],
            area_id: None,
        });
        push(("content", a, 1), e, format!("{day}T10:00:00Z"));
    }
    // Ten upvotes on the first answer (score 10), then a downvote (score 9).
    let first = answers[0];
    for i in 0..11u64 {
        let v = ContentVoted {
            content_id: first,
            voter_id: Uuid::new_v4(),
            previous: None,
            content_author_id: Some(u),
            tags: vec![],
            area_id: None,
            on_answer: true,
            // As the content aggregate counts it: 1..=10, then 9 after the downvote.
            score: Some(if i < 10 { i as i64 + 1 } else { 9 }),
        };
        let e = if i < 10 {
            Event::ContentUpvoted(v)
        } else {
            Event::ContentDownvoted(v)
        };
        push(
            ("content", first, 2 + i),
            e,
            format!("2024-03-14T0{}:00:00Z", i % 10),
        );
    }
    // Another user's question accepts the second answer.
    let e = Event::AnswerAccepted(AnswerAccepted {
        question_id: question,
        answer_id: answers[1],
        question_author_id: Some(Uuid::new_v4()),
        answer_author_id: Some(u),
        tags: vec![],
        area_id: None,
    });
    push(("content", question, 2), e, "2024-03-15T12:00:00Z".into());
    out
}

/// SplitMix64, for reproducible delivery plans.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
}

/// Every event twice, in a random order that keeps each aggregate's first deliveries in
/// sequence order (duplicates land anywhere after their original).
fn plan(events: &[EventEnvelope], rng: &mut Rng) -> Vec<EventEnvelope> {
    let mut queues: BTreeMap<Uuid, Vec<&EventEnvelope>> = BTreeMap::new();
    for e in events {
        queues.entry(e.aggregate_id).or_default().push(e);
    }
    let mut queues: Vec<Vec<&EventEnvelope>> = queues.into_values().collect();
    for q in &mut queues {
        q.reverse();
    }
    let mut order: Vec<EventEnvelope> = Vec::new();
    while queues.iter().any(|q| !q.is_empty()) {
        let live: Vec<usize> = (0..queues.len())
            .filter(|&i| !queues[i].is_empty())
            .collect();
        let q = live[rng.below(live.len())];
        let e = queues[q].pop().unwrap().clone();
        order.push(e.clone());
        let at = order.len() + rng.below(8);
        order.insert(at.min(order.len()), e);
    }
    order
}

/// Delivers `plan` three at a time through `workers` (chosen at random); a delivery that loses
/// a race on the profile (`Conflict`, one attempt per command) is delivered again later.
async fn deliver(plan: Vec<EventEnvelope>, workers: &[Arc<dyn Policy>; 2], rng: &mut Rng) {
    let mut queue = std::collections::VecDeque::from(plan);
    let mut rounds = 0;
    while !queue.is_empty() {
        rounds += 1;
        assert!(rounds < 10_000, "delivery does not progress");
        let mut running = tokio::task::JoinSet::new();
        for env in queue.drain(..3.min(queue.len())) {
            let policy = workers[rng.below(2)].clone();
            running.spawn(async move {
                let event = env.decode().unwrap();
                let r = policy.react(&env, &event).await;
                (env, r)
            });
        }
        while let Some(done) = running.join_next().await {
            match done.unwrap() {
                (_, Ok(())) => {}
                (env, Err(CommandError::Conflict { .. })) => queue.push_back(env),
                (_, Err(e)) => panic!("policy failed: {e}"),
            }
        }
    }
}

fn reward(rules: &GamificationRules, id: &str) -> i64 {
    rules
        .achievements
        .iter()
        .chain(&rules.quests)
        .find(|g| g.id == id)
        .unwrap_or_else(|| panic!("{id} in the default rules"))
        .xp_reward
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goals_are_reached_once_under_shuffled_duplicated_concurrent_delivery() {
    for seed in [1u64, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> =
            Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap());
        let rules = GamificationRules::default();
        let worker = || -> Arc<dyn Policy> {
            let h = CommandHandler::new(store.clone()).with_max_attempts(1);
            Arc::new(Gamification::new(h, XpRules::default(), rules.clone()))
        };
        let workers = [worker(), worker()];
        let mut rng = Rng(seed);
        let u = Uuid::new_v4();
        let sources = history(u);
        deliver(plan(&sources, &mut rng), &workers, &mut rng).await;

        // The unlock events are events too: the policy awards their rewards, once.
        let unlocks: Vec<EventEnvelope> = store
            .load("profile", u)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| {
                e.event_type == "gamification.achievement.unlocked"
                    || e.event_type == "gamification.quest.completed"
            })
            .collect();
        deliver(plan(&unlocks, &mut rng), &workers, &mut rng).await;

        let stored = store.load("profile", u).await.unwrap();
        let mut reached: Vec<String> = Vec::new();
        let mut total = None;
        let mut awarded = BTreeMap::new();
        for e in &stored {
            match e.decode().unwrap() {
                Event::AchievementUnlocked(a) => reached.push(a.achievement_id),
                Event::QuestCompleted(q) => reached.push(format!("{}@{}", q.quest_id, q.period)),
                Event::StreakMilestone(m) => reached.push(format!("streak:{}", m.days)),
                Event::XpEarned(x) => {
                    *awarded.entry(x.source_event_id).or_insert(0) += 1;
                    total = Some(x.total_xp);
                }
                _ => {}
            }
        }
        reached.sort();
        assert_eq!(
            reached,
            [
                "answer-score-10",
                "first-accepted-answer",
                "first-answer",
                "streak-7",
                "streak:7",
                "ten-answers",
                "weekly-contributor@2024-W10",
                "weekly-contributor@2024-W11",
            ],
            "seed {seed}"
        );
        // Each source (12 answers, 11 votes, 1 accept, 7 unlocks) awarded exactly once.
        assert_eq!(awarded.len(), 12 + 11 + 1 + 7, "seed {seed}");
        assert!(awarded.values().all(|n| *n == 1), "seed {seed}");
        let xp = XpRules::default();
        let base = 12 * xp.answer_submitted + 10 * xp.upvoted + xp.downvoted + xp.accepted_answer;
        let rewards: i64 = [
            "first-answer",
            "ten-answers",
            "answer-score-10",
            "first-accepted-answer",
            "streak-7",
        ]
        .iter()
        .map(|id| reward(&rules, id))
        .sum::<i64>()
            + 2 * reward(&rules, "weekly-contributor");
        assert_eq!(total, Some(base + rewards), "seed {seed}");
    }
}
