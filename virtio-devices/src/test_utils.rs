//! Test helpers: a recording `MsiVectors`, guest memory and a driver-side split virtqueue.

use std::sync::Mutex;

use crate::interrupt::{InterruptError, MsiMessage, MsiVectors};

/// Records routes and triggered vectors.
pub struct MockMsi {
    routes: Mutex<Vec<Option<MsiMessage>>>,
    triggered: Mutex<Vec<u16>>,
}

impl MockMsi {
    pub fn new(n: usize) -> Self {
        MockMsi {
            routes: Mutex::new(vec![None; n]),
            triggered: Mutex::new(Vec::new()),
        }
    }

    pub fn route(&self, v: u16) -> Option<MsiMessage> {
        self.routes.lock().unwrap()[usize::from(v)]
    }

    pub fn triggered(&self) -> Vec<u16> {
        self.triggered.lock().unwrap().clone()
    }
}

impl MsiVectors for MockMsi {
    fn len(&self) -> usize {
        self.routes.lock().unwrap().len()
    }

    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut r = self.routes.lock().unwrap();
        let slot = r
            .get_mut(usize::from(vector))
            .ok_or(InterruptError::InvalidVector(vector))?;
        *slot = msg;
        Ok(())
    }

    fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        self.triggered.lock().unwrap().push(vector);
        Ok(())
    }
}
