//! The HTTP API's state: the application's ports ([`App`]) and the concerns of the HTTP edge
//! alone — authentication, rate limits and CORS ([`Security`]), live updates ([`Live`]) and
//! Polar billing ([`Billing`]). Handlers take the part they need as axum sub-state
//! (`State<Arc<App>>`, `State<Arc<Security>>`, …) through [`FromRef`].

use std::sync::Arc;

use axum::extract::FromRef;

use super::fresh::ReadWait;
use super::security::Security;
use crate::app::App;
use crate::billing::Billing;
use crate::live::{Live, Notifier};

/// Everything the router serves from (module docs).
#[derive(Clone)]
pub struct ApiState {
    /// The ports: store, read models, bus, command handler, rules.
    pub app: Arc<App>,
    /// Authentication, rate limits and CORS (issue #4). [`ApiState::new`] sets
    /// [`Security::ephemeral`]; the `tektree` binary replaces it from its options.
    pub security: Arc<Security>,
    /// Live updates over WebSockets (issue #6, [`crate::live`]): `None` until
    /// [`ApiState::with_live`]; the `/ws/*` endpoints answer 503 without it.
    pub live: Option<Arc<Live>>,
    /// Polar billing (issue #6, [`crate::billing`]): disabled (its endpoints answer 503
    /// `billing_unconfigured`) until [`ApiState::with_billing`].
    pub billing: Billing,
    /// How long a query with `min_position` waits for its read models ([`ReadWait`], default
    /// 1 s).
    pub read_wait: ReadWait,
}

impl ApiState {
    /// The API over `app`: ephemeral security, no live updates, billing disabled.
    pub fn new(app: App) -> ApiState {
        ApiState {
            app: Arc::new(app),
            security: Arc::new(Security::ephemeral()),
            live: None,
            billing: Billing::disabled(),
            read_wait: ReadWait::default(),
        }
    }

    /// With queries waiting up to `wait` for a `min_position` (read-your-writes).
    pub fn with_read_wait(mut self, wait: ReadWait) -> ApiState {
        self.read_wait = wait;
        self
    }

    /// With the API secured by `security`.
    pub fn with_security(mut self, security: Security) -> ApiState {
        self.security = Arc::new(security);
        self
    }

    /// With live updates (issue #6): the app gains the `live` consumer
    /// ([`Notifier`], publishing to `live`'s fan-out) and the `/ws/*` endpoints serve from
    /// `live`. Open `live` with the same bus URL as the app ([`Live::open`]).
    pub fn with_live(mut self, live: Live) -> ApiState {
        let live = Arc::new(live);
        let notifier = Arc::new(Notifier::new(live.clone(), self.app.read_models.clone()));
        self.app = Arc::new(self.app.as_ref().clone().with_consumer(notifier));
        self.live = Some(live);
        self
    }

    /// With Polar billing (issue #6; [`Billing::from_args`] or [`Billing::new`]).
    pub fn with_billing(mut self, billing: Billing) -> ApiState {
        self.billing = billing;
        self
    }
}

impl FromRef<ApiState> for Arc<App> {
    fn from_ref(state: &ApiState) -> Self {
        state.app.clone()
    }
}

impl FromRef<ApiState> for ReadWait {
    fn from_ref(state: &ApiState) -> Self {
        state.read_wait
    }
}

impl FromRef<ApiState> for Arc<Security> {
    fn from_ref(state: &ApiState) -> Self {
        state.security.clone()
    }
}

impl FromRef<ApiState> for Option<Arc<Live>> {
    fn from_ref(state: &ApiState) -> Self {
        state.live.clone()
    }
}

impl FromRef<ApiState> for Billing {
    fn from_ref(state: &ApiState) -> Self {
        state.billing.clone()
    }
}
