// Link flags of a Python extension module (on macOS: leave the Python symbols to the interpreter).
fn main() {
    pyo3_build_config::add_extension_module_link_args();
}
