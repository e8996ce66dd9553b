//! This instance's sockets, and the routing of fan-out messages to them.
//!
//! Each socket has a bounded queue ([`LiveConfig::queue`](super::LiveConfig::queue)
//! messages). Routing never waits: a message for a socket whose queue is full removes that
//! socket from the hub and *kicks* it (its task then closes the connection with 1008), so a
//! client that does not read costs at most one full queue of shared message texts, never more.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::message::RANK_CHANGED;

/// Which endpoint a socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws/notifications`: the token subject's messages (every type but `rank.changed`).
    Notifications,
    /// `/ws/leaderboard`: `rank.changed` of the subscribed boards.
    Leaderboard,
}

impl Endpoint {
    /// `notifications` or `leaderboard` (the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Notifications => "notifications",
            Endpoint::Leaderboard => "leaderboard",
        }
    }
}

/// The routing keys of a fan-out message (the rest is passed through untouched).
#[derive(Deserialize)]
struct RouteKeys {
    #[serde(rename = "type")]
    kind: String,
    user_id: Option<Uuid>,
    board: Option<String>,
}

/// One registered socket.
struct Slot {
    tx: mpsc::Sender<Utf8Bytes>,
    kick: Arc<Notify>,
    endpoint: Endpoint,
    user: Uuid,
    boards: BTreeSet<String>,
}

#[derive(Default)]
struct Registry {
    sockets: HashMap<u64, Slot>,
    /// Notification sockets by user.
    users: HashMap<Uuid, HashSet<u64>>,
    /// Leaderboard sockets by board.
    boards: HashMap<String, HashSet<u64>>,
}

impl Registry {
    /// Removes socket `id` from every index; `true` if it was there.
    fn remove(&mut self, id: u64) -> bool {
        let Some(slot) = self.sockets.remove(&id) else {
            return false;
        };
        if slot.endpoint == Endpoint::Notifications {
            if let Some(set) = self.users.get_mut(&slot.user) {
                set.remove(&id);
                if set.is_empty() {
                    self.users.remove(&slot.user);
                }
            }
        }
        for b in &slot.boards {
            if let Some(set) = self.boards.get_mut(b) {
                set.remove(&id);
                if set.is_empty() {
                    self.boards.remove(b);
                }
            }
        }
        metrics::gauge!("tektree_live_sockets", "endpoint" => slot.endpoint.as_str())
            .decrement(1.0);
        true
    }
}

/// The sockets of one API instance.
#[derive(Default)]
pub struct Hub {
    registry: Mutex<Registry>,
    next_id: AtomicU64,
}

/// A socket's side of its registration: its queue and kick signal. Dropping it removes the
/// socket from the hub.
pub struct Registration {
    /// Socket id within the hub.
    pub id: u64,
    /// Messages routed to the socket, oldest first.
    pub rx: mpsc::Receiver<Utf8Bytes>,
    /// Notified once when the hub dropped the socket because its queue was full.
    pub kicked: Arc<Notify>,
    hub: Arc<Hub>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.lock().remove(self.id);
    }
}

/// Why a board subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoardError {
    /// The socket already follows `max` boards.
    #[error("a socket follows at most {0} boards; unsubscribe one first")]
    TooMany(usize),
    /// The socket is no longer registered (it is being closed).
    #[error("the socket is closing")]
    Gone,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain maps behind; keep using them.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a socket of `endpoint` for `user` with a queue of `queue` messages (at
    /// least 1).
    pub fn register(
        self: &Arc<Self>,
        endpoint: Endpoint,
        user: Uuid,
        queue: usize,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(queue.max(1));
        let kick = Arc::new(Notify::new());
        let mut reg = self.lock();
        reg.sockets.insert(
            id,
            Slot {
                tx,
                kick: kick.clone(),
                endpoint,
                user,
                boards: BTreeSet::new(),
            },
        );
        if endpoint == Endpoint::Notifications {
            reg.users.entry(user).or_default().insert(id);
        }
        metrics::gauge!("tektree_live_sockets", "endpoint" => endpoint.as_str()).increment(1.0);
        Registration {
            id,
            rx,
            kicked: kick,
            hub: self.clone(),
        }
    }

    /// Adds `board` to socket `id`'s boards (at most `max`); returns them all, sorted.
    ///
    /// # Errors
    /// [`BoardError`].
    pub fn subscribe(&self, id: u64, board: &str, max: usize) -> Result<Vec<String>, BoardError> {
        let mut reg = self.lock();
        let slot = reg.sockets.get_mut(&id).ok_or(BoardError::Gone)?;
        if !slot.boards.contains(board) {
            if slot.boards.len() >= max {
                return Err(BoardError::TooMany(max));
            }
            slot.boards.insert(board.to_string());
        }
        let boards = slot.boards.iter().cloned().collect();
        reg.boards.entry(board.to_string()).or_default().insert(id);
        Ok(boards)
    }

    /// Removes `board` from socket `id`'s boards; returns the remaining ones, sorted.
    ///
    /// # Errors
    /// [`BoardError::Gone`].
    pub fn unsubscribe(&self, id: u64, board: &str) -> Result<Vec<String>, BoardError> {
        let mut reg = self.lock();
        let slot = reg.sockets.get_mut(&id).ok_or(BoardError::Gone)?;
        slot.boards.remove(board);
        let boards = slot.boards.iter().cloned().collect();
        if let Some(set) = reg.boards.get_mut(board) {
            set.remove(&id);
            if set.is_empty() {
                reg.boards.remove(board);
            }
        }
        Ok(boards)
    }

    /// Sockets currently registered.
    pub fn len(&self) -> usize {
        self.lock().sockets.len()
    }

    /// `true` without sockets.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues the fan-out message `text` on every socket it is for: `rank.changed` on the
    /// leaderboard sockets of its `board`, any other type on the notification sockets of its
    /// `user_id`. Never waits; sockets whose queue is full are removed and kicked. Messages
    /// that are not such JSON objects are skipped (logged).
    pub fn route(&self, text: String) {
        let keys: RouteKeys = match serde_json::from_str(&text) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "live fan-out message without type/user_id; skipped");
                return;
            }
        };
        let text = Utf8Bytes::from(text);
        let mut reg = self.lock();
        let targets: Vec<u64> = if keys.kind == RANK_CHANGED {
            keys.board
                .and_then(|b| reg.boards.get(&b))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        } else {
            keys.user_id
                .and_then(|u| reg.users.get(&u))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        };
        for id in targets {
            let Some(slot) = reg.sockets.get(&id) else {
                continue;
            };
            match slot.tx.try_send(text.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let (kick, endpoint) = (slot.kick.clone(), slot.endpoint);
                    reg.remove(id);
                    kick.notify_one();
                    tracing::info!(
                        socket = id,
                        endpoint = endpoint.as_str(),
                        "live socket dropped: its queue is full (slow client)"
                    );
                    metrics::counter!("tektree_live_slow_clients_dropped_total",
                        "endpoint" => endpoint.as_str())
                    .increment(1);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    reg.remove(id);
                }
            }
        }
    }
}
