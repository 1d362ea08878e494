// What the page sends: the request body built from the form, and the same request as curl.

/** The request body: paragraphs become chunks "1", "2", ...; text starting with "{" is the body. */
export function buildBody(text, threshold) {
  const trimmed = text.trim();
  let body;
  if (trimmed.startsWith("{")) {
    try {
      body = JSON.parse(trimmed);
    } catch (error) {
      throw new Error(`Chunks: the text starts with "{" but is not valid JSON (${error.message})`);
    }
  } else {
    const paragraphs = trimmed.split(/\n[ \t]*\n/).map((p) => p.trim()).filter((p) => p !== "");
    if (paragraphs.length === 0) throw new Error("Chunks: paste at least one chunk");
    body = { chunks: paragraphs.map((p, i) => ({ id: String(i + 1), text: p })) };
  }
  if (threshold !== "") body.threshold = Number(threshold);
  body.explain = true; // the page shows why each chunk was kept or dropped
  return body;
}

/** The request as a curl command line (POSIX shell quoting). */
export function curlCommand(url, body, apiKey) {
  const quote = (s) => `'${s.replaceAll("'", `'\\''`)}'`;
  const parts = ["curl -N", quote(url), "-H 'Content-Type: application/json'"];
  if (apiKey) parts.push("-H " + quote(`Authorization: Bearer ${apiKey}`));
  parts.push("--data-binary " + quote(JSON.stringify(body)));
  return parts.join(" ");
}
