//! Requests that share round trips. MongoDB inserts and outcome records, and
//! Redis enqueues and settles, each go through one: concurrent requests ride
//! in one request to the server instead of one each.

use tokio::sync::{mpsc, oneshot};

/// Most requests one batched round trip carries.
const MAX_BATCH: usize = 256;

/// A task takes every request waiting (up to MAX_BATCH) and runs them
/// together; one batch at a time, so those that arrive during a round trip
/// form the next batch. Alone, a request goes at once.
pub struct Batcher<I, O> {
    requests: mpsc::UnboundedSender<(I, oneshot::Sender<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Start the batching task; `run` answers a batch with one output per
    /// input, in order.
    pub fn spawn<F, Fut>(run: F) -> Batcher<I, O>
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (requests, mut waiting) = mpsc::unbounded_channel::<(I, oneshot::Sender<O>)>();
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match waiting.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                let (inputs, answers): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
                // In a task of its own: a panic fails this batch only.
                if let Ok(outputs) = tokio::spawn(run(inputs)).await {
                    for (answer, output) in answers.into_iter().zip(outputs) {
                        let _ = answer.send(output);
                    }
                }
            }
        });
        Batcher { requests }
    }

    /// Run one request in the next batch. None when its batch failed
    /// without answering (a panic) or the task has stopped.
    pub async fn call(&self, input: I) -> Option<O> {
        let (answer, answered) = oneshot::channel();
        self.requests.send((input, answer)).ok()?;
        answered.await.ok()
    }
}
