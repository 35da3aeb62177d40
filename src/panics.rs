//! Panics inside a dependency on one row's data (an image decoder on a hostile file) are caught
//! per row and become that row's reason. [`quietly`] runs such code with the process's panic
//! hook told to stay quiet on this thread: one `warn` line in the log instead of a message and
//! backtrace on the user's terminal. Panics anywhere else still print as usual.

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

fn install() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) {
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                tracing::warn!("caught a panic on one row's data{at}: {}", message(info.payload()));
            } else {
                previous(info);
            }
        }));
    });
}

/// The text of a panic payload.
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Run `f`, turning a panic into `Err(message)` without printing it.
pub fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install();
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r.map_err(|p| message(p.as_ref()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(super::quietly(|| 7), Ok(7));
        let r: Result<(), String> = super::quietly(|| panic!("bad huffman table {}", 3));
        assert_eq!(r, Err("bad huffman table 3".to_string()));
        let r: Result<(), String> = super::quietly(|| std::panic::panic_any(5u8));
        assert_eq!(r.unwrap_err(), "a panic without a message");
    }
}
