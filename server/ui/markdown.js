// A small, safe Markdown renderer for the chat page: the text is HTML-escaped first, then
// headings, emphasis, lists, quotes, links (http/https only), inline code and fenced code blocks
// (with a simple keyword highlighter) are turned into markup. No dependencies.
"use strict";

const HearthMarkdown = (() => {
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  const KEYWORDS = new Set((
    "if else elif for while do return function def class import from as with try except catch " +
    "finally raise throw new delete const let var fn pub struct enum impl match use mod async " +
    "await yield lambda in is not and or None True False null true false undefined this self " +
    "static void int float double char bool string public private protected package interface " +
    "extends implements switch case break continue default go func type defer select range " +
    "print echo local end then elseif begin module require include template typename auto"
  ).split(" "));

  // One regex over the raw code: comments, strings, numbers, words; the rest is plain.
  const TOKEN = new RegExp([
    "(\\/\\/[^\\n]*|#[^\\n]*|\\/\\*[\\s\\S]*?\\*\\/|--[^\\n]*)",          // 1 comment
    "(\"(?:\\\\.|[^\"\\\\\\n])*\"?|'(?:\\\\.|[^'\\\\\\n])*'?|`(?:\\\\.|[^`\\\\])*`?)", // 2 string
    "(\\b\\d+(?:\\.\\d+)?(?:e[+-]?\\d+)?\\b|\\b0x[0-9a-f]+\\b)",            // 3 number
    "([A-Za-z_][A-Za-z0-9_]*)",                                               // 4 word
  ].join("|"), "gi");

  function highlight(code, lang) {
    const hashComments = !/^(c|cpp|c\+\+|js|javascript|ts|typescript|java|go|rust|css)$/i
      .test(lang || "");
    let out = "";
    let last = 0;
    code.replace(TOKEN, (match, comment, str, num, word, offset) => {
      out += escapeHtml(code.slice(last, offset));
      last = offset + match.length;
      if (comment && (comment[0] !== "#" || hashComments)) {
        out += `<span class="tok-com">${escapeHtml(match)}</span>`;
      } else if (comment) {  // '#' in a C-like language (#include): not a comment
        out += escapeHtml(match[0]);
        last = offset + 1;
      } else if (str) {
        out += `<span class="tok-str">${escapeHtml(match)}</span>`;
      } else if (num) {
        out += `<span class="tok-num">${escapeHtml(match)}</span>`;
      } else if (word && KEYWORDS.has(word)) {
        out += `<span class="tok-kw">${escapeHtml(match)}</span>`;
      } else {
        out += escapeHtml(match);
      }
      return match;
    });
    return out + escapeHtml(code.slice(last));
  }

  // Inline markup over already-escaped text; code spans are kept aside first.
  function inline(escaped) {
    const spans = [];
    let text = escaped.replace(/`([^`]+)`/g, (_, code) => {
      spans.push(`<code>${code}</code>`);
      return `\u0000${spans.length - 1}\u0000`;
    });
    // links are set aside too, so emphasis never reaches into their markup (target="_blank")
    text = text.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)\u0000]+)\)/g, (_, label, href) => {
      spans.push(`<a href="${href}" target="_blank" rel="noopener noreferrer">${label}</a>`);
      return `\u0000${spans.length - 1}\u0000`;
    });
    text = text
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/__([^_]+)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
      .replace(/(^|[^\w_])_([^_\s][^_]*)_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~([^~]+)~~/g, "<del>$1</del>");
    const restore = (t) => t.replace(/\u0000(\d+)\u0000/g, (_, i) => spans[Number(i)]);
    return restore(restore(text)); // a link's label may hold a code span
  }

  function blocks(text) {
    const lines = text.split("\n");
    let html = "";
    let para = [];
    let list = null; // "ul" | "ol"
    const flushPara = () => {
      if (para.length) html += `<p>${para.map((l) => inline(escapeHtml(l))).join("<br>")}</p>`;
      para = [];
    };
    const closeList = () => {
      if (list) html += `</${list}>`;
      list = null;
    };
    for (const line of lines) {
      let m;
      if (!line.trim()) {
        flushPara();
        closeList();
      } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
        flushPara();
        closeList();
        const level = m[1].length;
        html += `<h${level}>${inline(escapeHtml(m[2]))}</h${level}>`;
      } else if ((m = /^\s*([-*+]|\d+[.)])\s+(.*)$/.exec(line))) {
        flushPara();
        const kind = /\d/.test(m[1]) ? "ol" : "ul";
        if (list !== kind) {
          closeList();
          html += `<${kind}>`;
          list = kind;
        }
        html += `<li>${inline(escapeHtml(m[2]))}</li>`;
      } else if ((m = /^>\s?(.*)$/.exec(line))) {
        flushPara();
        closeList();
        html += `<blockquote>${inline(escapeHtml(m[1]))}</blockquote>`;
      } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flushPara();
        closeList();
        html += "<hr>";
      } else {
        closeList();
        para.push(line);
      }
    }
    flushPara();
    closeList();
    return html;
  }

  // Fenced code blocks first (an unclosed fence, mid-stream, runs to the end), then the rest.
  function render(text) {
    let html = "";
    const fence = /^(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n([\s\S]*?)(?:^\1[ \t]*$|(?![\s\S]))/gm;
    let last = 0;
    let m;
    while ((m = fence.exec(text)) !== null) {
      html += blocks(text.slice(last, m.index));
      const lang = m[2];
      const code = m[3].replace(/\n$/, "");
      const cls = lang ? ` class="language-${escapeHtml(lang)}"` : "";
      html += `<pre><code${cls}>${highlight(code, lang)}</code></pre>`;
      last = fence.lastIndex;
      if (m[0].length === 0) fence.lastIndex++;
    }
    html += blocks(text.slice(last));
    return html;
  }

  return { render, escapeHtml, highlight };
})();
