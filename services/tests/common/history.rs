//! A deterministic command history, driven through an app's command handler.

use tektree_commands::CommandMeta;
use tektree_domain::{
    Actor, Content, ContentCommand, NoServices, User, UserCommand, VoteDirection,
};
use tektree_services::app::App;
use uuid::Uuid;

fn id(kind: &str, n: usize) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("test:{kind}:{n}").as_bytes())
}

/// The id of test user `n`.
pub fn user(n: usize) -> Uuid {
    id("user", n)
}

/// Registers the test users `users` (ids [`user`]).
pub async fn register(app: &App, users: std::ops::Range<usize>) {
    let meta = CommandMeta::new(Actor::importer(), "2024-01-07T12:00:00Z".parse().unwrap());
    for u in users {
        let cmd = UserCommand::Register {
            user_id: user(u),
            display_name: format!("user{u}"),
            preferences: Default::default(),
        };
        app.handler
            .execute::<User>(user(u), cmd, &NoServices, &meta)
            .await
            .unwrap();
    }
}

/// A deterministic history: 6 users, 3 questions, 9 answers, comments, votes with
/// replacements, accepts. Ids are fixed so that every bus run produces comparable rows.
pub async fn drive(app: &App) {
    let meta = || CommandMeta::new(Actor::importer(), "2024-01-07T12:00:00Z".parse().unwrap());
    register(app, 0..6).await;
    for q in 0..3 {
        let cmd = ContentCommand::PostQuestion {
            question_id: id("q", q),
            author_id: Some(id("user", q)),
            title: format!("question {q}"),
            body: String::new(),
            tags: vec![format!("t{q}"), "common".into()],
            actor: Actor::importer(),
            area_id: None,
        };
        app.handler
            .execute::<Content>(id("q", q), cmd, &app.knowledge, &meta())
            .await
            .unwrap();
        for a in 0..3 {
            let n = q * 3 + a;
            let cmd = ContentCommand::SubmitAnswer {
                answer_id: id("a", n),
                question_id: id("q", q),
                author_id: Some(id("user", (n + 1) % 6)),
                body: "answer".into(),
                actor: Actor::importer(),
            };
            app.handler
                .execute::<Content>(id("a", n), cmd, &app.knowledge, &meta())
                .await
                .unwrap();
            for v in 0..6 {
                for d in [VoteDirection::Up, VoteDirection::Down] {
                    if (n + v) % 3 == 0 && d == VoteDirection::Down {
                        continue;
                    }
                    let cmd = ContentCommand::Vote {
                        content_id: id("a", n),
                        voter_id: id("user", v),
                        direction: if (n * v) % 4 == 0 {
                            d
                        } else {
                            VoteDirection::Up
                        },
                        actor: Actor::importer(),
                    };
                    app.handler
                        .execute::<Content>(id("a", n), cmd, &app.knowledge, &meta())
                        .await
                        .unwrap();
                }
            }
            let cmd = ContentCommand::AddComment {
                content_id: id("a", n),
                comment_id: id("c", n),
                author_id: Some(id("user", v_of(n))),
                text: "comment".into(),
                actor: Actor::importer(),
            };
            app.handler
                .execute::<Content>(id("a", n), cmd, &app.knowledge, &meta())
                .await
                .unwrap();
        }
        let cmd = ContentCommand::AcceptAnswer {
            question_id: id("q", q),
            answer_id: id("a", q * 3 + 1),
            actor: Actor::importer(),
        };
        app.handler
            .execute::<Content>(id("q", q), cmd, &app.knowledge, &meta())
            .await
            .unwrap();
    }
}

fn v_of(n: usize) -> usize {
    (n * 5) % 6
}
