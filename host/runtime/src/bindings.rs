//! The host side of the `kinesis:task` world, generated from `wit/task.wit`.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "kinesis-task",
});
