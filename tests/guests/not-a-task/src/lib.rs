//! A component of another world (it exports `test:greet/greet`): not a kinesis-host task.

wit_bindgen::generate!({ path: "wit", world: "greeter" });

struct Greeter;

impl exports::test::greet::greet::Guest for Greeter {
    fn hello() -> String {
        "hello".to_owned()
    }
}

export!(Greeter);
