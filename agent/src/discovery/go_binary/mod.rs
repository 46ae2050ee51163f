//! Go executables (x86-64 Linux ELF): which toolchain and modules built
//! them, and where their functions and returns are, for uprobes on Go
//! functions.
//!
//! Everything is read from the file's bytes: nothing here runs the binary
//! or trusts it; malformed files give errors, never panics.
//! - [`inspect`]: the build info (`go version -m`).
//! - [`find_functions`]: functions by their Go name
//!   (`crypto/tls.(*Conn).Read`), from `.symtab` when the file has one,
//!   else from Go's own function table (`.gopclntab`), which stripped
//!   binaries (`-ldflags=-s -w`) keep; each with the file offsets of its
//!   entry and of its `RET` instructions.


mod buildinfo;
mod image;
mod pclntab;
mod returns;
mod symbols;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

use object::{Architecture, Object, ObjectKind};

use image::Image;
use pclntab::{Function, Pclntab};

/// What a Go executable says about how it was built.
#[derive(Clone, Debug, PartialEq)]
pub struct GoBinary {
    /// The toolchain, as `go version` prints it: `go1.21.13`.
    pub go_version: String,
    /// Every module linked in, (path, version): the main module first
    /// (version usually `(devel)`), then the dependencies, each with the
    /// version of the code built (a replacement's version when it has one).
    /// Empty for GOPATH builds (`GO111MODULE=off`).
    pub modules: Vec<(String, String)>,
    /// The main module's path; None for GOPATH builds.
    pub main_module: Option<String>,
    /// No `.symtab` (`-ldflags=-s`, `strip`): functions come from the
    /// function table.
    pub stripped: bool,
    /// A position-independent executable (ELF type `ET_DYN`).
    pub pie: bool,
}

/// A function to probe, by file offsets (what uprobes take).
#[derive(Clone, Debug, PartialEq)]
pub struct GoFunction {
    pub name: String,
    pub entry_offset: u64,
    /// Every `RET` instruction of the function, in address order.
    pub return_offsets: Vec<u64>,
    /// Every direct call (`call rel32`): (the call, its target's offset).
    pub call_offsets: Vec<(u64, u64)>,
}

/// The build info of the file `data`; `Ok(None)` when it is not a Go
/// executable (not ELF, or no Go build info, which every Go 1.13+
/// executable has). Errors for malformed ELF files and unreadable build
/// info.
pub fn inspect(data: &[u8]) -> Result<Option<GoBinary>, String> {
    let Some(image) = Image::parse(data)? else {
        return Ok(None);
    };
    let Some(info) = buildinfo::read(&image)? else {
        return Ok(None);
    };
    Ok(Some(GoBinary {
        go_version: info.go_version,
        modules: info.modules,
        main_module: info.main_module,
        stripped: !symbols::has_symbol_table(&image),
        pie: image.elf.kind() == ObjectKind::Dynamic,
    }))
}

/// The functions of the Go executable `data` among `names` (Go symbol
/// names), in the order of `names`; names it does not define are left out.
/// A function whose body does not decode as x86-64 code is left out too,
/// with a warning: a return probe inside an instruction would break the
/// program.
pub fn find_functions(data: &[u8], names: &[&str]) -> Result<Vec<GoFunction>, String> {
    find_functions_from(data, names, Lookup::SymbolTableFirst)
}

/// Where [`find_functions_from`] looks names up.
#[derive(Clone, Copy, PartialEq)]
enum Lookup {
    /// `.symtab`, then the function table for what it lacks.
    SymbolTableFirst,
    /// The function table only, as for a stripped file (tests compare both).
    #[cfg(test)]
    FunctionTableOnly,
}

fn find_functions_from(
    data: &[u8],
    names: &[&str],
    lookup: Lookup,
) -> Result<Vec<GoFunction>, String> {
    let image = Image::parse(data)?.ok_or("not an ELF file")?;
    if image.elf.architecture() != Architecture::X86_64 {
        return Err(format!(
            "unsupported architecture {:?}",
            image.elf.architecture()
        ));
    }
    let wanted: HashSet<&str> = names.iter().copied().collect();
    let functions = locate(&image, &wanted, lookup)?;
    let mut found: Vec<GoFunction> = functions
        .into_iter()
        .filter_map(|function| probe_points(&image, function))
        .collect();
    found.sort_by_key(|f| names.iter().position(|name| *name == f.name));
    Ok(found)
}

/// The wanted functions' entries and ends, one per name.
fn locate(
    image: &Image<'_>,
    wanted: &HashSet<&str>,
    lookup: Lookup,
) -> Result<Vec<Function>, String> {
    let from_symbols = match lookup {
        Lookup::SymbolTableFirst => symbols::functions_named(image, wanted),
        #[cfg(test)]
        Lookup::FunctionTableOnly => None,
    };
    let Some(from_symbols) = from_symbols else {
        let table = Pclntab::of(image, None)?;
        return Ok(one_per_name(table.functions_named(wanted)));
    };
    let without_size = from_symbols.functions.iter().any(|f| f.end <= f.entry);
    let missing: HashSet<&str> = wanted
        .iter()
        .copied()
        .filter(|name| !from_symbols.functions.iter().any(|f| f.name == *name))
        .collect();
    if !without_size && missing.is_empty() {
        return Ok(from_symbols.functions);
    }
    let table = Pclntab::of(image, from_symbols.text_start)?;
    let mut functions: Vec<Function> = from_symbols
        .functions
        .into_iter()
        .filter_map(|mut f| {
            if f.end <= f.entry {
                f.end = table.end_of(f.entry)?;
            }
            Some(f)
        })
        .collect();
    functions.extend(one_per_name(table.functions_named(&missing)));
    Ok(functions)
}

/// The function table may list a name twice: an assembly function's ABI
/// wrapper has its name (`.symtab` calls it `name.abi0`). The real body is
/// the larger.
fn one_per_name(functions: Vec<Function>) -> Vec<Function> {
    let mut chosen: Vec<Function> = Vec::with_capacity(functions.len());
    for function in functions {
        match chosen.iter_mut().find(|f| f.name == function.name) {
            Some(seen) if length(&function) > length(seen) => *seen = function,
            Some(_) => {}
            None => chosen.push(function),
        }
    }
    chosen
}

/// The file offsets of a function's entry and returns; None (and a
/// warning) when its body cannot be decoded or is not in executable code.
fn probe_points(image: &Image<'_>, function: Function) -> Option<GoFunction> {
    let executable = image.loads.iter().any(|load| {
        load.executable()
            && load.address <= function.entry
            && function.end <= load.address.saturating_add(load.file_size)
    });
    let result = if executable {
        returns::code_sites(image, function.entry, function.end)
    } else {
        Err("not inside an executable segment".into())
    };
    let entry_offset = image.offset_of(function.entry);
    match (result, entry_offset) {
        (Ok(sites), Some(entry_offset)) => Some(GoFunction {
            name: function.name,
            entry_offset,
            return_offsets: sites.returns,
            call_offsets: sites.calls,
        }),
        (Err(e), _) => {
            log::warn!(
                "Go function {} at {:#x}: {e}",
                function.name,
                function.entry
            );
            None
        }
        (Ok(_), None) => None,
    }
}

fn length(function: &Function) -> u64 {
    function.end.saturating_sub(function.entry)
}
