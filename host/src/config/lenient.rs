//! A deserializer over a YAML tree that reads *strings* as whatever type the setting asks for.
//!
//! `POSEIDON_*` variables are strings, like in Poseidon: they are put into the tree verbatim (never
//! parsed as YAML, so `#x`, `&x`, `*x` and `null` stay those tokens) and only this deserializer,
//! which knows the type each setting wants, turns `"7300"` into a port, `"true"` into a boolean
//! (Go's `ParseBool` spellings) and `"dc1 dc2"` into a list (space-separated, optionally wrapped in
//! double quotes, as Poseidon reads string lists). Numbers and booleans written in the file work
//! unchanged. The type is only known inside `Deserialize`, hence a deserializer rather than a
//! pass over the tree.

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde_yaml::Value;

/// A YAML value deserialized with string-to-type conversion (see the module documentation).
pub struct Lenient(pub Value);

type Error = serde_yaml::Error;

fn parse<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, Error> {
    without_digit_separators(text.trim())
        .parse()
        .map_err(|_| de::Error::custom(format!("expected {what}, found {text:?}")))
}

/// `30_000` as Go's YAML reads it (Poseidon's example file writes numbers so): underscores
/// between digits go; anything else stays as it is.
fn without_digit_separators(text: &str) -> std::borrow::Cow<'_, str> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    let separated = digits.contains('_')
        && digits.starts_with(|c: char| c.is_ascii_digit())
        && digits.ends_with(|c: char| c.is_ascii_digit())
        && digits.chars().all(|c| c.is_ascii_digit() || c == '_');
    if separated {
        text.replace('_', "").into()
    } else {
        text.into()
    }
}

/// Go's `strconv.ParseBool`, which Poseidon uses for boolean variables.
fn parse_bool(text: &str) -> Result<bool, Error> {
    match text.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(de::Error::custom(format!(
            "expected a boolean (true or false), found {other:?}"
        ))),
    }
}

/// A space-separated list, optionally wrapped in double quotes.
fn split_list(text: &str) -> Vec<Value> {
    let text = text.trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    text.split_whitespace()
        .map(|s| Value::String(s.to_string()))
        .collect()
}

macro_rules! number {
    ($($method:ident => $visit:ident : $ty:ty, $what:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.0 {
                Value::String(s) => visitor.$visit(parse::<$ty>(&s, $what)?),
                other => other.$method(visitor),
            }
        }
    )*};
}

macro_rules! forward {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.0.$method(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Lenient {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Mapping(map) => visitor.visit_map(Map {
                entries: map.into_iter(),
                value: None,
            }),
            Value::Sequence(items) => visitor.visit_seq(Seq(items.into_iter())),
            Value::Tagged(tagged) => Lenient(tagged.value).deserialize_any(visitor),
            other => other.deserialize_any(visitor),
        }
    }

    number! {
        deserialize_u8 => visit_u8: u8, "a whole number (0-255)";
        deserialize_u16 => visit_u16: u16, "a whole number (0-65535)";
        deserialize_u32 => visit_u32: u32, "a whole number";
        deserialize_u64 => visit_u64: u64, "a whole number";
        deserialize_i8 => visit_i8: i8, "a whole number";
        deserialize_i16 => visit_i16: i16, "a whole number";
        deserialize_i32 => visit_i32: i32, "a whole number";
        deserialize_i64 => visit_i64: i64, "a whole number";
        deserialize_f32 => visit_f32: f32, "a number";
        deserialize_f64 => visit_f64: f64, "a number";
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_bool(parse_bool(&s)?),
            other => other.deserialize_bool(visitor),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Number(n) => visitor.visit_string(n.to_string()),
            Value::Bool(b) => visitor.visit_string(b.to_string()),
            other => Lenient(other).deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(Lenient(other)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_seq(Seq(split_list(&s).into_iter())),
            other => Lenient(other).deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            other => other.deserialize_enum(name, variants, visitor),
        }
    }

    forward!(
        deserialize_char,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }
}

struct Map {
    entries: serde_yaml::mapping::IntoIter,
    value: Option<Value>,
}

impl<'de> de::MapAccess<'de> for Map {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(Lenient(key)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self.value.take().unwrap_or(Value::Null);
        seed.deserialize(Lenient(value))
    }
}

struct Seq(std::vec::IntoIter<Value>);

impl<'de> de::SeqAccess<'de> for Seq {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0
            .next()
            .map(|value| seed.deserialize(Lenient(value)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Sample {
        port: u16,
        on: bool,
        token: String,
        list: Vec<String>,
        ratio: Option<f64>,
    }

    fn read(yaml: &str) -> Result<Sample, Error> {
        Sample::deserialize(Lenient(serde_yaml::from_str(yaml).unwrap()))
    }

    #[test]
    fn strings_become_the_type_asked_for() {
        let s = read("{port: '7300', on: 'T', token: '12345', list: '\"a  b\"', ratio: '0.5'}")
            .unwrap();
        assert_eq!(
            s,
            Sample {
                port: 7300,
                on: true,
                token: "12345".into(),
                list: vec!["a".into(), "b".into()],
                ratio: Some(0.5),
            }
        );
    }

    #[test]
    fn typed_yaml_still_works_and_bad_strings_are_named() {
        let s = read("{port: 80, on: false, token: 7, list: [x], ratio: null}").unwrap();
        assert_eq!(
            (s.port, s.on, s.token.as_str(), s.ratio),
            (80, false, "7", None)
        );
        let e = read("{port: 'x80', on: true, token: a, list: [], ratio: 1}").unwrap_err();
        assert!(e.to_string().contains("\"x80\""), "{e}");
        let e = read("{port: 1, on: 'yes', token: a, list: [], ratio: 1}").unwrap_err();
        assert!(e.to_string().contains("boolean"), "{e}");
    }

    #[test]
    fn numbers_may_separate_digits_with_underscores_as_in_go_yaml() {
        let s = read("{port: '7_300', on: true, token: a, list: [], ratio: 1}").unwrap();
        assert_eq!(s.port, 7300);
        for bad in ["'_7300'", "'7300_'", "'7__3x'"] {
            let yaml = format!("{{port: {bad}, on: true, token: a, list: [], ratio: 1}}");
            assert!(read(&yaml).is_err(), "{bad}");
        }
    }
}
