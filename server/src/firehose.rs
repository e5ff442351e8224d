//! The safety firehose (`GET /v1/safety/events`): one [`SafetyEvent`] per diagnosed request
//! when it finishes, published by the engine. The app state owns it.
//!
//! Events go through a bounded broadcast channel: publishing never waits, and a subscriber that
//! falls more than [`EVENT_BUFFER`] events behind loses the oldest ones (counted in
//! `tga_diagnostics_events_dropped_total` when it notices), so a slow dashboard can never slow
//! serving.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use model::diagnostics::{Band, Modality, Summary};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

/// Events a subscriber may fall behind before it loses the oldest.
pub const EVENT_BUFFER: usize = 1024;
/// Open `/v1/safety/events` streams at most (each costs a task and a buffer cursor); beyond it
/// a 429.
pub const MAX_SUBSCRIBERS: usize = 64;

/// One diagnosed request, as dashboards see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SafetyEvent {
    pub request_id: String,
    /// Unix time in seconds when the request finished.
    pub time: f64,
    /// `text`, `image` or `mixed`.
    #[schema(value_type = String)]
    pub modality: Modality,
    pub activation_layer: Option<usize>,
    /// The configured safety layer (`--safety-layer`).
    pub safety_layer: usize,
    /// `p_refusal` at the safety layer.
    pub p_refusal: Option<f64>,
    /// The configured layer band (`--safety-band`), `[lo, hi]`.
    pub cos_band: [usize; 2],
    /// Mean image–text cosine over that band; null without a caption pass.
    pub cos_band_mean: Option<f64>,
    /// The judge's verdict on the answer; null when nothing was generated.
    pub refused: Option<bool>,
    /// True for an ordinary chat request diagnosed by `--diagnose-sample-rate`.
    pub sampled: bool,
}

impl SafetyEvent {
    /// The event of a request that finished now.
    pub fn new(
        request_id: &str,
        summary: &Summary,
        safety_layer: usize,
        p_refusal: Option<f64>,
        cos_band: Band,
        cos_band_mean: Option<f64>,
        sampled: bool,
    ) -> Self {
        let Band(lo, hi) = cos_band;
        Self {
            request_id: request_id.to_string(),
            time: unix_time(),
            modality: summary.modality,
            activation_layer: summary.activation_layer,
            safety_layer,
            p_refusal,
            cos_band: [lo, hi],
            cos_band_mean,
            refused: summary.refused,
            sampled,
        }
    }
}

/// The broadcast side of the firehose. Closing it (at shutdown) ends every subscriber's stream
/// once it has read what was already published, so open dashboards do not hold the exit.
#[derive(Debug)]
pub struct Firehose {
    sender: Mutex<Option<broadcast::Sender<Arc<SafetyEvent>>>>,
    capacity: usize,
}

impl Firehose {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (sender, _) = broadcast::channel(capacity);
        Self {
            sender: Mutex::new(Some(sender)),
            capacity,
        }
    }

    fn sender(&self) -> Option<broadcast::Sender<Arc<SafetyEvent>>> {
        self.sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Never blocks; with no subscriber the event is simply not seen (that is not a drop).
    pub fn publish(&self, event: SafetyEvent) {
        if let Some(sender) = self.sender() {
            let _ = sender.send(Arc::new(event));
        }
    }

    /// A receiver of every event published from now on (a closed one after [`Self::close`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<SafetyEvent>> {
        match self.sender() {
            Some(sender) => sender.subscribe(),
            None => broadcast::channel(self.capacity).1,
        }
    }

    pub fn subscribers(&self) -> usize {
        self.sender().map_or(0, |s| s.receiver_count())
    }

    /// Ends the firehose: subscribers read what is left, then their streams end.
    pub fn close(&self) {
        self.sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
    }
}

impl Default for Firehose {
    fn default() -> Self {
        Self::new(EVENT_BUFFER)
    }
}

fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> SafetyEvent {
        SafetyEvent {
            request_id: format!("r{i}"),
            time: 0.0,
            modality: Modality::Text,
            activation_layer: None,
            safety_layer: 2,
            p_refusal: Some(0.5),
            cos_band: [1, 2],
            cos_band_mean: None,
            refused: Some(false),
            sampled: false,
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_loses_the_oldest_events_and_publishing_never_waits() {
        let hub = Firehose::new(4);
        let mut fast = hub.subscribe();
        let mut slow = hub.subscribe();
        for i in 0..3 {
            hub.publish(event(i));
            assert_eq!(fast.recv().await.unwrap().request_id, format!("r{i}"));
        }
        for i in 3..10 {
            hub.publish(event(i));
        }
        // The slow one is told how many it lost, then reads the newest four.
        match slow.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(slow.recv().await.unwrap().request_id, "r6");
        // Publishing with nobody listening is fine.
        drop((fast, slow));
        hub.publish(event(11));
        assert_eq!(hub.subscribers(), 0);
    }

    #[tokio::test]
    async fn closing_ends_subscriptions_after_what_was_published() {
        let hub = Firehose::new(4);
        let mut rx = hub.subscribe();
        hub.publish(event(1));
        hub.close();
        hub.publish(event(2));
        assert_eq!(rx.recv().await.unwrap().request_id, "r1");
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        let mut late = hub.subscribe();
        assert!(matches!(
            late.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }
}
