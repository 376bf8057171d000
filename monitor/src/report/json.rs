use std::io::{self, Write};

use super::Sink;
use crate::report::finding::{Finding, Repeated};

/// One JSON object per line.
pub struct JsonSink<W> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write + Send> Sink for JsonSink<W> {
    fn emit(&mut self, finding: &Finding) -> io::Result<()> {
        self.out.write_all(finding.to_json_line().as_bytes())?;
        self.out.flush()
    }

    fn emit_repeated(&mut self, repeated: &Repeated) -> io::Result<()> {
        self.out.write_all(repeated.to_json_line().as_bytes())?;
        self.out.flush()
    }
}
