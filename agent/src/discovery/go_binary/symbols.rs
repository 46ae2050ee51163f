//! Functions by name from the ELF symbol table (`.symtab`), which Go's
//! linker writes unless told `-s`.

use std::collections::HashSet;

use object::{Object, ObjectSymbol, ObjectSymbolTable, SymbolKind};

use super::image::Image;
use super::pclntab::Function;

/// `runtime.text`'s address: where Go 1.18+ function table entries start.
pub(super) const TEXT_START: &str = "runtime.text";

/// What the symbol table says: the wanted functions and `runtime.text`.
/// A function's `end` equals its `entry` when the symbol has no size (the
/// function table knows it).
pub(super) struct SymbolTableFunctions {
    pub functions: Vec<Function>,
    pub text_start: Option<u64>,
}

/// `None` when the file has no (or an empty) `.symtab`.
pub(super) fn functions_named(
    image: &Image<'_>,
    names: &HashSet<&str>,
) -> Option<SymbolTableFunctions> {
    let table = image.elf.symbol_table()?;
    let mut found = SymbolTableFunctions {
        functions: Vec::new(),
        text_start: None,
    };
    let mut any = false;
    for symbol in table.symbols() {
        any = true;
        if symbol.kind() != SymbolKind::Text || symbol.is_undefined() {
            continue;
        }
        let Ok(name) = symbol.name() else {
            continue;
        };
        if name == TEXT_START {
            found.text_start = Some(symbol.address());
        }
        if names.contains(name) && !found.functions.iter().any(|f| f.name == name) {
            found.functions.push(Function {
                name: name.to_owned(),
                entry: symbol.address(),
                end: symbol.address().saturating_add(symbol.size()),
            });
        }
    }
    any.then_some(found)
}

/// Whether the file has a non-empty `.symtab`.
pub(super) fn has_symbol_table(image: &Image<'_>) -> bool {
    image
        .elf
        .symbol_table()
        .is_some_and(|table| table.symbols().next().is_some())
}
