// Server-Sent Events read from a fetch() response: EventSource cannot POST a body.

/** Yield each event of the stream as {type, data} (data parsed as JSON); comments are skipped. */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A CR at the very end may be the first half of a CRLF: keep it for the next read.
    const complete = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, complete).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(complete);
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { type: event.type, data: JSON.parse(event.data.join("\n")) };
        event = { type: "message", data: [] };
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event.type = text;
        else if (field === "data") event.data.push(text);
      }
    }
  }
}
