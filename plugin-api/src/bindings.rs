//! Generated bindings for the `poseidon:plugins@0.1.0` worlds (see `wit/` at the
//! repository root). Not part of the public API: use the re-exports and traits of the
//! crate root instead.

/// Bindings of the `pool-sizer-plugin` world; also the home of the shared `host` and
/// `types` interfaces.
pub mod pool_sizer {
    wit_bindgen::generate!({
        world: "pool-sizer-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__poseidon_export_pool_sizer_world",
        default_bindings_module: "poseidon_plugin_api::__bindings::pool_sizer",
        additional_derives: [PartialEq, Eq],
        // The other worlds reuse this module's `types`, so generate all of them here.
        generate_unused_types: true,
    });
}

/// Bindings of the `preprocessor-plugin` world.
pub mod preprocessor {
    wit_bindgen::generate!({
        world: "preprocessor-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__poseidon_export_preprocessor_world",
        default_bindings_module: "poseidon_plugin_api::__bindings::preprocessor",
        additional_derives: [PartialEq, Eq],
        with: {
            "poseidon:plugins/host@0.1.0": crate::__bindings::pool_sizer::poseidon::plugins::host,
            "poseidon:plugins/types@0.1.0": crate::__bindings::pool_sizer::poseidon::plugins::types,
        },
    });
}

/// Bindings of the `authenticator-plugin` world.
pub mod authenticator {
    wit_bindgen::generate!({
        world: "authenticator-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__poseidon_export_authenticator_world",
        default_bindings_module: "poseidon_plugin_api::__bindings::authenticator",
        additional_derives: [PartialEq, Eq],
        with: {
            "poseidon:plugins/host@0.1.0": crate::__bindings::pool_sizer::poseidon::plugins::host,
            "poseidon:plugins/types@0.1.0": crate::__bindings::pool_sizer::poseidon::plugins::types,
        },
    });
}
