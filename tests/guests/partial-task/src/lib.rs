//! A component exporting `kinesis:task/task@0.1.0` without its `process` function: the host
//! must refuse it and name the missing export.

wit_bindgen::generate!({ path: "wit", world: "partial-task" });

struct Partial;

impl exports::kinesis::task::task::Guest for Partial {
    fn init(_config: Vec<(String, String)>) -> Result<(), exports::kinesis::task::task::TaskError> {
        Ok(())
    }

    fn shutdown() {}
}

export!(Partial);
