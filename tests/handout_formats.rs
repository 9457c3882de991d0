//! The hand-out formats, read back with a real XML parser: what goes in comes out, whatever
//! characters it holds.

use fleetgate::export::{self, Format, Handout, PublicGateway};
use fleetgate::pki::Fingerprint;

fn fingerprint() -> Fingerprint {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        *x = i as u8 * 7;
    }
    Fingerprint(b)
}

fn gateways() -> Vec<PublicGateway> {
    vec![
        PublicGateway {
            host: "gw1.example.com".into(),
            port: 8443,
        },
        PublicGateway {
            // Not a sensible host, but it must survive every format intact.
            host: "gw2&<x>\"'.example".into(),
            port: 443,
        },
        PublicGateway {
            host: "2001:db8::7".into(),
            port: 9443,
        },
    ]
}

fn keys() -> Vec<String> {
    vec![
        "K7Q2-9XM4-T3HB-WP0R-ZC8D".into(),
        "Mass<&>'\"]]>-2025".into(),
        "<script>alert(1)</script>".into(),
    ]
}

/// (key, host, port, [part; 4]) for every key × gateway, in document order.
type Entry = (String, String, u16, Vec<String>);

fn expected() -> Vec<Entry> {
    let parts = fingerprint().parts().to_vec();
    keys()
        .into_iter()
        .flat_map(|k| {
            let parts = parts.clone();
            gateways()
                .into_iter()
                .map(move |g| (k.clone(), g.host, g.port, parts.clone()))
        })
        .collect()
}

fn render(format: Format) -> String {
    let (g, k, fp) = (gateways(), keys(), fingerprint());
    export::render(
        &Handout {
            gateways: &g,
            fingerprint: &fp,
            keys: &k,
        },
        format,
    )
    .unwrap()
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> roxmltree::Node<'a, 'i> {
    n.children()
        .find(|c| c.has_tag_name(name))
        .unwrap_or_else(|| panic!("no <{name}>"))
}

#[test]
fn icg_xml_parses_back_to_the_input() {
    let xml = render(Format::Xml);
    let doc = roxmltree::Document::parse(&xml).expect("well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "icg");
    assert_eq!(root.attribute("version"), Some("1"));
    let mut got: Vec<Entry> = Vec::new();
    for cred in root.children().filter(|n| n.has_tag_name("credential")) {
        let key = child(cred, "key").text().unwrap().to_owned();
        for gw in cred.children().filter(|n| n.has_tag_name("gateway")) {
            let host = child(gw, "host").text().unwrap().to_owned();
            let port = child(gw, "port").text().unwrap().parse().unwrap();
            let parts: Vec<(String, String)> = child(gw, "fingerprint")
                .children()
                .filter(|n| n.has_tag_name("part"))
                .map(|p| {
                    (
                        p.attribute("index").unwrap().to_owned(),
                        p.text().unwrap().to_owned(),
                    )
                })
                .collect();
            let indexes: Vec<&str> = parts.iter().map(|(i, _)| i.as_str()).collect();
            assert_eq!(indexes, ["1", "2", "3", "4"]);
            got.push((
                key.clone(),
                host,
                port,
                parts.into_iter().map(|p| p.1).collect(),
            ));
        }
    }
    assert_eq!(got, expected());
}

#[test]
fn icg_html_shows_everything_escaped_one_table_per_key() {
    let html = render(Format::Html);
    // No input reaches the page unescaped.
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("@media print"), "print CSS");
    assert!(
        !html.contains("src=") && !html.contains("href="),
        "self-contained"
    );

    // The page is also well-formed XML: read the tables back.
    let doc = roxmltree::Document::parse_with_options(
        &html,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .expect("well-formed");
    let tables: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("table"))
        .collect();
    assert_eq!(tables.len(), keys().len(), "one table per key");
    let mut got: Vec<Entry> = Vec::new();
    for table in tables {
        let rows: Vec<(String, String)> = table
            .children()
            .filter(|n| n.has_tag_name("tr"))
            .filter_map(|tr| {
                let th = tr.children().find(|c| c.has_tag_name("th"))?;
                let td = tr.children().find(|c| c.has_tag_name("td"))?;
                Some((th.text()?.to_owned(), td.text()?.to_owned()))
            })
            .collect();
        assert_eq!(rows[0].0, "Key");
        let key = rows[0].1.clone();
        for block in rows[1..].chunks(6) {
            let labels: Vec<&str> = block.iter().map(|(l, _)| l.as_str()).collect();
            assert_eq!(
                labels,
                [
                    "Host",
                    "Port",
                    "Fingerprint Part 1",
                    "Fingerprint Part 2",
                    "Fingerprint Part 3",
                    "Fingerprint Part 4"
                ]
            );
            got.push((
                key.clone(),
                block[0].1.clone(),
                block[1].1.parse().unwrap(),
                block[2..].iter().map(|(_, v)| v.clone()).collect(),
            ));
        }
    }
    assert_eq!(got, expected());
}

#[test]
fn text_blocks_read_back() {
    let text = render(Format::Text);
    let mut got: Vec<Entry> = Vec::new();
    for block in text.split("\n\n") {
        let fields: Vec<(&str, &str)> = block
            .lines()
            .map(|l| l.split_once(": ").expect("Label: value"))
            .collect();
        let labels: Vec<&str> = fields.iter().map(|f| f.0).collect();
        assert_eq!(
            labels,
            [
                "Host",
                "Port",
                "Fingerprint Part 1",
                "Fingerprint Part 2",
                "Fingerprint Part 3",
                "Fingerprint Part 4",
                "Key"
            ]
        );
        got.push((
            fields[6].1.to_owned(),
            fields[0].1.to_owned(),
            fields[1].1.parse().unwrap(),
            fields[2..6].iter().map(|f| f.1.to_owned()).collect(),
        ));
    }
    // Text is grouped the same way: per key, every gateway.
    assert_eq!(got, expected());
}
