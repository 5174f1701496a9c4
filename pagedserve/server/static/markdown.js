// A small Markdown renderer for model answers: fenced code, inline code, bold, italic, lists,
// headings, quotes and rules. It builds DOM nodes and puts model text in only as text nodes, so
// nothing the model writes is ever parsed as HTML. Links are shown as text, never made clickable.
"use strict";

const PagedMarkdown = (() => {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  // Inline spans, earliest match first: code, bold, italic, link.
  const INLINE = new RegExp([
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",        // 1, 2: code span
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",             // 3: bold
    "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])",  // 4: bold
    "\\*(?=[^\\s*])([^*]*?[^\\s*])\\*",               // 5: italic
    "(?<![\\w])_(?=[^\\s_])([^_]*?[^\\s_])_(?![\\w])", // 6: italic
    "\\[([^\\]\\n]+)\\]\\(((?:[^()\\s]|\\([^()\\s]*\\))+)\\)", // 7, 8: link (one level of parentheses)
  ].join("|"), "g");

  function element(tag, className, children = []) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    node.append(...children);
    return node;
  }

  function inline(text) {
    const nodes = [];
    let last = 0;
    for (const match of text.matchAll(INLINE)) {
      if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
      last = match.index + match[0].length;
      if (match[2] !== undefined) nodes.push(element("code", null, [match[2]]));
      else if (match[3] !== undefined || match[4] !== undefined) {
        nodes.push(element("strong", null, inline(match[3] ?? match[4])));
      } else if (match[5] !== undefined || match[6] !== undefined) {
        nodes.push(element("em", null, inline(match[5] ?? match[6])));
      } else {
        nodes.push(element("span", "link", [...inline(match[7]), " (", element("span", "url", [match[8]]), ")"]));
      }
    }
    if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
    return nodes;
  }

  function linesWithBreaks(lines) {
    const nodes = [];
    lines.forEach((line, index) => {
      if (index > 0) nodes.push(document.createElement("br"));
      nodes.push(...inline(line));
    });
    return nodes;
  }

  function codeBlock(lines, start, fence, language) {
    const body = [];
    let index = start;
    while (index < lines.length && !lines[index].trim().startsWith(fence)) body.push(lines[index++]);
    const code = element("code", language ? `language-${language}` : null, [body.join("\n")]);
    const pre = element("pre", null, [code]);
    if (language) pre.dataset.language = language;
    return [pre, index + 1];   // skip the closing fence (or run off the end while it streams in)
  }

  function list(lines, start, pattern, ordered) {
    const items = [];
    let index = start;
    while (index < lines.length) {
      const match = lines[index].match(pattern);
      if (match) {
        items.push([ordered ? match[2] : match[1]]);
      } else if (items.length && /^\s{2,}\S/.test(lines[index])) {
        items[items.length - 1].push(lines[index].trim());   // a continuation line of the item
      } else {
        break;
      }
      index++;
    }
    const node = element(ordered ? "ol" : "ul", null, items.map((item) => element("li", null, linesWithBreaks(item))));
    if (ordered) node.start = Number(lines[start].match(pattern)[1]);
    return [node, index];
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line) ||
      QUOTE.test(line) || RULE.test(line);
  }

  function blocks(text) {
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    const nodes = [];
    let index = 0;
    while (index < lines.length) {
      const line = lines[index];
      let match;
      if (!line.trim()) {
        index++;
      } else if ((match = line.match(FENCE))) {
        let node;
        [node, index] = codeBlock(lines, index + 1, match[1], match[2]);
        nodes.push(node);
      } else if (RULE.test(line)) {
        nodes.push(document.createElement("hr"));
        index++;
      } else if ((match = line.match(HEADING))) {
        nodes.push(element(`h${match[1].length}`, null, inline(match[2])));
        index++;
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const ordered = !BULLET.test(line);
        let node;
        [node, index] = list(lines, index, ordered ? NUMBERED : BULLET, ordered);
        nodes.push(node);
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (index < lines.length && (match = lines[index].match(QUOTE))) {
          quoted.push(match[1]);
          index++;
        }
        nodes.push(element("blockquote", null, blocks(quoted.join("\n"))));
      } else {
        const paragraph = [];
        while (index < lines.length && lines[index].trim() && (!paragraph.length || !startsBlock(lines[index]))) {
          paragraph.push(lines[index++]);
        }
        nodes.push(element("p", null, linesWithBreaks(paragraph)));
      }
    }
    return nodes;
  }

  /** Replace `target`'s children with `text` rendered as Markdown. */
  function render(text, target) {
    target.replaceChildren(...blocks(text));
  }

  return { render };
})();
