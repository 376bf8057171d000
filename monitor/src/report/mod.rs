//! Where findings go: JSON lines (stdout or a file) and a readable terminal line.

pub mod finding;
pub mod fold;
pub mod hint;
pub mod suppress;

mod json;
pub mod output_file;
mod text;

use std::io;

pub use json::JsonSink;
pub use text::TextSink;

use crate::report::finding::{Finding, Repeated};

pub trait Sink: Send {
    /// Writes one finding. Sinks flush every finding: findings are rare and a log shipper (or a
    /// human) should see each one at once, not when a buffer fills.
    fn emit(&mut self, finding: &Finding) -> io::Result<()>;
    /// Writes the record of findings folded by report/fold.rs.
    fn emit_repeated(&mut self, repeated: &Repeated) -> io::Result<()>;
}

/// Fans a finding out to every configured sink; one failing sink does not starve the others.
#[derive(Default)]
pub struct Sinks {
    sinks: Vec<Box<dyn Sink>>,
}

impl Sinks {
    pub fn push(&mut self, sink: Box<dyn Sink>) {
        self.sinks.push(sink);
    }

    pub fn emit(&mut self, finding: &Finding) {
        for sink in &mut self.sinks {
            if let Err(err) = sink.emit(finding) {
                tracing::error!(%err, kind = finding.kind.as_str(), "writing a finding failed");
            }
        }
    }

    pub fn emit_repeated(&mut self, repeated: &Repeated) {
        for sink in &mut self.sinks {
            if let Err(err) = sink.emit_repeated(repeated) {
                tracing::error!(%err, "writing a repeated record failed");
            }
        }
    }
}
